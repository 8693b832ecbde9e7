"""Build data/raw/av_sample, the small video <-> audio dataset embedded in the repo.

From the shared ``av_films`` folder it takes every window of the three recordings whose
films are CC BY (Big Buck Bunny 0-60 s, the Sintel trailer, the Sintel excerpt; never
agent327, which is CC BY-ND), and from ``av_clips_small`` the 11 GRID utterances (CC BY
4.0). Media files are copied byte for byte; ``items.jsonl`` has the av_films format
(the ``av_films`` reader reads it): film rows as in the source, GRID lines with ``recording``
and ``licence`` added.

    python scripts/make_av_sample.py --shared /work/shared/datasets
"""
from __future__ import annotations

import argparse
import json
import shutil
from collections import Counter
from pathlib import Path

from cmr.io import atomic_path

FILMS = ("bbb_0_60", "sintel_trailer", "sintel_excerpt")
GRID_LICENCE = "GRID audiovisual sentence corpus (Cooke, Barker, Cunningham, Shao 2006), CC BY 4.0 (Zenodo record 3625687)"
FILM_ATTRIBUTION = "(c) copyright Blender Foundation | www.bigbuckbunny.org / www.sintel.org"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def select(shared: Path) -> list[tuple[Path, dict]]:
    """(source folder, items.jsonl row) of every item of the sample, films first."""
    films = [(shared / "av_films", r) for r in _rows(shared / "av_films" / "items.jsonl") if r["recording"] in FILMS]
    grid = [
        (shared / "av_clips_small", r | {"recording": r["group"], "licence": GRID_LICENCE})
        for r in _rows(shared / "av_clips_small" / "items.jsonl")
        if r["group"].startswith("grid_")
    ]
    if len(grid) != 11 or {r["recording"] for _, r in films} != set(FILMS):
        raise SystemExit(f"expected 11 GRID utterances and recordings {FILMS}: found {len(grid)} and "
                         f"{sorted({r['recording'] for _, r in films})}")
    return films + grid


def readme(rows: list[dict], n_bytes: int) -> str:
    per_recording = Counter("GRID" if r["recording"].startswith("grid_") else r["recording"]
                            for r in rows)
    counts = ", ".join(f"{k} {n}" for k, n in per_recording.items())
    return f"""# av_sample

A small video <-> audio dataset embedded in cmr: {len(rows)} pairs of a silent video clip (MP4, H.264) and its own
soundtrack (WAV, 16 kHz mono), {n_bytes / 2**20:.1f} MiB. Built by `scripts/make_av_sample.py` from two folders of the
project's shared datasets, files copied byte for byte; read by the `av_films` reader.

## Sources and licences

- Big Buck Bunny (0-60 s) and Sintel (the trailer and a 26 s excerpt), 2 s windows from the shared `av_films`
  folder (its README gives the repository snapshots they came from and how they were cut: 128 px high, 8 fps,
  16 kHz mono). Big Buck Bunny and Sintel are Blender Foundation open movies under CC BY 3.0 (the repositories
  the files came from state no licence; this is the films' published licence, not verified offline).
  Attribution: "{FILM_ATTRIBUTION}".
  Agent 327 (in `av_films` too) is CC BY-ND and is NOT included.
- 11 utterances of the GRID audiovisual sentence corpus (3 s each, 200x160 at 12 fps, 16 kHz mono) from the shared
  `av_clips_small` folder: M. Cooke, J. Barker, S. Cunningham, X. Shao, "An audio-visual corpus for speech
  perception and automatic speech recognition", J. Acoust. Soc. Am. 120(5), 2006; corpus distributed under
  CC BY 4.0 (Zenodo record 3625687; as the `av_clips_small` README says, not stated by the repository the files
  came from and not verified offline). The clips are re-encoded (scaled, frame rate changed), not otherwise changed.

## Counts

{len(rows)} items ({counts}); {2 * len(rows)} media files, {n_bytes:,} bytes.

## items.jsonl (the av_films format)

`id`, `recording`, `group` (the recording; the reader joins both Sintel recordings into one film group, and each
GRID utterance is its own group), `video`, `audio`, `start`, `end` (s, in the source), `text` (null for the films;
for GRID the spoken sentence, which the reader keeps in `meta["transcript"]`), `source`, `licence`, and the probe
fields of the source folders (`video_width`, `video_height`, `video_frames`, `video_duration`, `audio_duration`, ...).
Splits: a film is one group, so it is wholly in one split; with the default fractions (val 0.1, test 0.15) both films
go to train and the GRID utterances fill val (4) and test (7): a smoke test, not a benchmark.
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=Path("/work/shared/datasets"))
    ap.add_argument("--out", type=Path, default=Path("data/raw/av_sample"))
    args = ap.parse_args(argv)

    chosen = select(args.shared)
    with atomic_path(args.out) as tmp:
        tmp.mkdir()
        n_bytes = 0
        for folder, row in chosen:
            for field in ("video", "audio"):
                dst = tmp / row[field]
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / row[field], dst)
                n_bytes += dst.stat().st_size
        rows = [row for _, row in chosen]
        (tmp / "items.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        (tmp / "README.md").write_text(readme(rows, n_bytes), encoding="utf-8")
    print(f"{args.out}: {len(rows)} items, {n_bytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
