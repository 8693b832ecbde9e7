"""Build data/raw/openclipart_mini, the small public-domain dataset cmr runs on by default.

From the openclipart folder (items.jsonl + images/, see its README) it keeps the items
whose title describes the picture (collection titles dropped, as the ``openclipart``
reader does) and whose captions are 2-512 characters long, then takes at most
``--per-category`` items from each category, in the order of SHA-256(salt + id) so the
choice is deterministic and independent of file order. Images are copied byte for
byte; items.jsonl keeps the source lines unchanged (same format, same reader).

    python scripts/make_default_dataset.py --source /work/shared/datasets/openclipart
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

from cmr.data.readers import READERS
from cmr.io import atomic_path

SALT = "cmr openclipart_mini v1"


def select(source: Path, per_category: int, min_chars: int, max_chars: int) -> list[str]:
    """Ids of the chosen items, in source order."""
    usable = [
        it for it in READERS.get("openclipart")(source).items if all(min_chars <= len(t) <= max_chars for t in it.texts)
    ]
    rank = sorted(usable, key=lambda it: hashlib.sha256(f"{SALT}\x00{it.id}".encode()).hexdigest())
    taken: Counter[str] = Counter()
    chosen = set()
    for it in rank:
        category = it.id.split("/", 1)[0]
        if taken[category] < per_category:
            taken[category] += 1
            chosen.add(it.id)
    return [it.id for it in usable if it.id in chosen]


def readme(rows: list[dict], n_source: int, args) -> str:
    per_category = Counter(r["category"] for r in rows)
    n_bytes = sum(r["_bytes"] for r in rows)
    cats = ", ".join(f"{c} {n}" for c, n in per_category.most_common())
    return f"""# openclipart_mini

The default dataset of cmr: {len(rows):,} public-domain clip-art images with their titles and descriptions,
{len(per_category)} categories, {n_bytes / 2**20:.1f} MiB. It is a subset of the `openclipart` folder of the
project's shared datasets ({n_source:,} items), built by `scripts/make_default_dataset.py`, and is read by the
`openclipart` reader exactly as the full folder is.

## Source

- Debian packages `openclipart-png` and `openclipart-svg`, version `1:0.18+dfsg-19` (Debian bookworm); the PNG
  files give the images, the RDF metadata of the matching SVG files give title, description and keywords.
  Upstream: http://www.openclipart.org.
- The source folder converted each PNG to a JPEG (quality 90, longer side at most 224 px, composited onto
  white) and wrote one JSON line per item; see that folder's README for every step.

## Licence: public domain

- The packages' copyright file (`usr/share/doc/openclipart-png/copyright`) gives, under "Copyright:",
  "creative commons Public Domain Dedication", followed by the "Copyright-Only Dedication (based on United States
  law) or Public Domain Certification" text.
- The SVG metadata of the works carries `<cc:license rdf:resource="http://web.resource.org/cc/PublicDomain"/>`.

The images and texts may therefore be copied, changed and redistributed without restriction; this folder does so.

## How it was made

1. All {n_source:,} items of the source `items.jsonl` were read with the `openclipart` reader, which drops items
   whose title names a collection rather than the picture (`gramastar`, `Part of the Flat Icon Collection (...)`,
   `Lemon SVG theme`, `card`, `AIGA_Symbol_Signs`, `Clipart by Nicu Buculei - ...`, ...; see
   `cmr.data.readers.COLLECTION_TITLES`) and ignores descriptions that are only an e-mail address, a
   collection note or licence text.
2. Items with a caption shorter than {args.min_chars} or longer than {args.max_chars} characters were dropped
   (the default text-length rule of data validation).
3. Within each category the items were ordered by SHA-256 of `"{SALT}" + NUL + id` and the first
   {args.per_category} kept (all of a smaller category).
4. The kept lines of `items.jsonl` were copied unchanged (same fields, same order as the source), and each
   item's JPEG was copied byte for byte to the same relative path under `images/`.

## Counts

- {len(rows):,} items, {len(rows):,} JPEG files, {n_bytes:,} bytes of images.
- {sum(1 for r in rows if r.get("title")):,} items have a title, {sum(1 for r in rows if r.get("description")):,} a description.
- Items per category: {cats}.

## Fields

As in the source folder: `id`, `image`, `title`, `description`, `keywords`, `category`, `subcategory`,
`also_linked_as`, `source_png`, `source_svg`, `width`, `height`, `orig_width`, `orig_height`.
`also_linked_as` may name paths of items that are not in this subset (they still give extra category labels).
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=Path("/work/shared/datasets/openclipart"))
    ap.add_argument("--out", type=Path, default=Path("data/raw/openclipart_mini"))
    ap.add_argument("--per-category", type=int, default=220)
    ap.add_argument("--min-chars", type=int, default=2)
    ap.add_argument("--max-chars", type=int, default=512)
    args = ap.parse_args(argv)

    chosen = set(select(args.source, args.per_category, args.min_chars, args.max_chars))
    lines = (args.source / "items.jsonl").read_text(encoding="utf-8").splitlines()
    n_source = sum(1 for line in lines if line.strip())
    kept = [(line, json.loads(line)) for line in lines if line.strip() and json.loads(line)["id"] in chosen]
    with atomic_path(args.out) as tmp:
        tmp.mkdir()
        rows = []
        for _, row in kept:
            dst = tmp / row["image"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(args.source / row["image"], dst)
            rows.append(row | {"_bytes": dst.stat().st_size})
        (tmp / "items.jsonl").write_text("".join(line + "\n" for line, _ in kept), encoding="utf-8")
        (tmp / "README.md").write_text(readme(rows, n_source, args), encoding="utf-8")
    print(f"{args.out}: {len(rows)} items, {sum(r['_bytes'] for r in rows) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
