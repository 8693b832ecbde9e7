"""Stage ingest: read a source with a registered reader, assign splits, write the prepared dataset."""
from __future__ import annotations

import sys

from cmr.data.prepare import prepare_dataset, save_prepared
from cmr.config import Params
from cmr.stages._common import log, stage_main


def run(reader: str, source: str, options: dict, val_fraction: float, test_fraction: float, split_seed: int,
        out_dir: str) -> dict:
    prepared = prepare_dataset(reader, source, options, val_fraction, test_fraction, split_seed)
    save_prepared(prepared, out_dir)
    log(f"ingest: {prepared.info.get('counts')} -> {out_dir}")
    if prepared.info.get("skipped"):
        log(f"ingest: left out of {source}: {prepared.info['skipped']}")
    return prepared.info


def from_params(p: Params):
    return run(p.data.reader, p.data.source, p.data.options, p.data.val_fraction, p.data.test_fraction, p.data.split_seed, p.paths.prepared)


def main(argv=None) -> int:
    return stage_main("ingest", from_params, argv)


if __name__ == "__main__":
    sys.exit(main())
