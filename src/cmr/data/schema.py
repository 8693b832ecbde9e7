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

#: field -> (JSON types it may have, the rule); every field but id and split may also be null
_FIELD_RULES = {
    "id": (str, "a non-empty string"),
    "split": (str, "a string"),
    "texts": (list, "a list of strings"),
    "labels": (list, "a list of strings"),
    "identity": (str, "a string or null"),
    "image": (str, "a string (a path) or null"),
    "audio": (str, "a string (a path) or null"),
    "video": (str, "a string (a path) or null"),
    "feature_row": (int, "an integer or null"),
    "meta": (dict, "an object"),
}


class ItemFieldError(ValueError):
    """A field of a JSON item has the wrong type: ``field``, the ``rule`` it breaks, its ``value``."""

    def __init__(self, field: str, rule: str, value):
        self.field, self.rule, self.value = field, rule, value
        super().__init__(f"field '{field}' is {rule}: got {json.dumps(value, default=str)[:80]}")


def _check_fields(d: dict) -> None:
    for name, (kind, rule) in _FIELD_RULES.items():
        value = d.get(name)
        if value is None and name not in ("id", "split"):
            continue
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if ok and name == "texts":
            ok = all(isinstance(t, str) for t in value)
        if ok and name == "labels":  # numbers are read as their text, as labels always were
            ok = all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in value)
        if not ok or (name == "id" and not value):
            raise ItemFieldError(name, rule, value)


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
        """The item a JSON object describes; a field of the wrong type raises :class:`ItemFieldError`."""
        if not isinstance(d, dict):
            raise ValueError(f"an item is a JSON object, got {json.dumps(d, default=str)[:80]}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown item field(s) {sorted(unknown)}; allowed: {sorted(known)}")
        _check_fields(d)
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
    """Read ``items.jsonl``; a malformed line raises :class:`cmr.errors.DataError` naming file and
    line (and, for a field of the wrong type, the field, the rule and the item id)."""
    from cmr.errors import DataError

    if not Path(path).is_file():
        raise DataError(str(path), "file exists", "not a prepared dataset folder")
    items = []
    with open(path, "rb") as f:  # bytes, so a line that is not UTF-8 is named exactly
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}", "UTF-8 text", f"byte 0x{raw[e.start]:02x}: {e.reason}") from None
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                items.append(Item.from_json(d))
            except ItemFieldError as e:
                raise DataError(
                    f"{path}:{lineno}", f"{e.field} is {e.rule}",
                    f"field '{e.field}' of item {d.get('id')!r} ({json.dumps(e.value, default=str)[:80]})",
                ) from None
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
