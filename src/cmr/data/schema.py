"""One item schema for every modality.

An :class:`Item` is one retrievable unit: an image (or audio clip, or video, or a
row of precomputed features) with the texts that describe it. Retrieval ground
truth is derived from items, never stored beside them:

* instance level: query text ``t`` of item ``i`` matches gallery item ``i`` only
  (several texts per item are several positives of the same item);
* class level: two items match when they share at least one ``labels`` entry;
* identity level (person search): two items match when ``identity`` is equal.

Paths are relative to the dataset root (the folder that holds ``items.jsonl``).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

SPLITS = ("train", "val", "test")
MODALITIES = ("image", "audio", "video", "text")


@dataclass(frozen=True)
class Item:
    id: str
    split: str
    texts: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    identity: str | None = None
    image: str | None = None
    audio: str | None = None
    video: str | None = None
    #: row of this item in the dataset's ``features.npz`` arrays (precomputed-feature sets)
    feature_row: int | None = None
    #: free-form extra fields from the source (licence, category path, ...), JSON-serialisable
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["texts"], d["labels"] = list(self.texts), list(self.labels)
        return {k: v for k, v in d.items() if v not in (None, {}, [])} | {"id": self.id, "split": self.split}

    @classmethod
    def from_json(cls, d: dict) -> "Item":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown item field(s) {sorted(unknown)}; allowed: {sorted(known)}")
        d = dict(d)
        d["texts"] = tuple(d.get("texts") or ())
        d["labels"] = tuple(str(x) for x in (d.get("labels") or ()))
        return cls(**d)


def write_items(path: str | Path, items: Iterable[Item]) -> int:
    """Write ``items.jsonl`` atomically; returns the count."""
    from cmr.io import atomic_path

    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it.to_json(), ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    return n


def read_items(path: str | Path) -> list[Item]:
    """Read ``items.jsonl``; a malformed line raises :class:`cmr.errors.DataError` naming file and line."""
    from cmr.errors import DataError

    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                items.append(Item.from_json(json.loads(line)))
            except (ValueError, TypeError) as e:
                raise DataError(f"{path}:{lineno}", "item schema", str(e)) from None
    return items


def by_split(items: Iterable[Item], split: str) -> list[Item]:
    return [it for it in items if it.split == split]


def iter_text_pairs(items: list[Item]) -> Iterator[tuple[int, str]]:
    """(item index, text) for every text of every item: the text-query side of a gallery."""
    for i, it in enumerate(items):
        for t in it.texts:
            yield i, t
