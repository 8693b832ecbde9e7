"""Stage validate: great-expectations suites over the prepared dataset; stops the pipeline on bad data.

The report is written (atomically) whether or not the data passes, so a failure can
be read; nothing downstream runs after a failure.
"""
from __future__ import annotations

import sys
from pathlib import Path

from cmr.data.prepare import load_prepared
from cmr.data.validate import MediaBounds, raise_on_failure, validate_prepared
from cmr.io import write_json
from cmr.config import Params
from cmr.stages._common import log, stage_main


def run(prepared_dir: str, min_chars: int, max_chars: int, report_path: str,
        media: MediaBounds = MediaBounds()) -> dict:
    prepared = load_prepared(prepared_dir)
    report = validate_prepared(prepared, min_chars, max_chars, media)
    write_json(report_path, report)
    raise_on_failure(report, str(Path(prepared_dir) / "items.jsonl"), prepared.origins)
    log(f"validate: all expectations met -> {report_path}")
    return report


def from_params(p: Params):
    m = p.media
    bounds = MediaBounds(min_video_frames=m.frames, min_seconds=m.min_seconds, max_seconds=m.max_seconds,
                         min_sample_rate=m.min_sample_rate, max_sample_rate=m.max_sample_rate,
                         min_rms_dbfs=m.min_rms_dbfs)
    return run(p.paths.prepared, p.data.min_text_chars, p.data.max_text_chars, p.paths.validation, bounds)


def main(argv=None) -> int:
    return stage_main("validate", from_params, argv)


if __name__ == "__main__":
    sys.exit(main())
