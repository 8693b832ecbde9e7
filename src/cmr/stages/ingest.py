"""Stage ingest: read a source with a registered reader, assign splits, write the prepared dataset."""
from __future__ import annotations

import sys

from cmr.data.prepare import prepare_dataset, save_prepared
from cmr.config import Params
from cmr.stages._common import log, stage_main


def run(reader: str, source: str, options: dict, val_fraction: float, test_fraction: float, split_seed: int,
        out_dir: str, on_invalid: str = "fail", min_text_chars: int = 1, max_text_chars: int = 1 << 30) -> dict:
    prepared = prepare_dataset(reader, source, options, val_fraction, test_fraction, split_seed,
                               on_invalid=on_invalid, min_text_chars=min_text_chars, max_text_chars=max_text_chars)
    save_prepared(prepared, out_dir)
    if prepared.dropped:
        first = prepared.dropped[0]
        log(f"ingest: data.on_invalid=drop removed {prepared.info['dropped']['items']} item(s) and "
            f"{prepared.info['dropped']['texts']} text(s), listed in {out_dir}/dropped.json "
            f"(first: {first['where']}: {first['dropped']} breaks '{first['rule']}')")
    log(f"ingest: {prepared.info.get('counts')} -> {out_dir}")
    if prepared.info.get("skipped"):
        log(f"ingest: left out of {source}: {prepared.info['skipped']}")
    return prepared.info


def from_params(p: Params):
    d = p.data
    return run(d.reader, d.source, d.options, d.val_fraction, d.test_fraction, d.split_seed, p.paths.prepared,
               d.on_invalid, d.min_text_chars, d.max_text_chars)


def main(argv=None) -> int:
    return stage_main("ingest", from_params, argv)


if __name__ == "__main__":
    sys.exit(main())
