"""The ``table`` reader: any JSON-lines or CSV file, its field names given as options.

A user's data needs no converter: name which field holds what::

    data:
      reader: table
      source: my_data/pairs.csv          # or a folder holding exactly one .jsonl/.csv file
      options: {id: photo_id, image: path, texts: [caption], labels: tags, label_separator: "|"}

Fields (option -> what the named field holds):

* ``id``: the item id (text or number; unique);
* ``image`` / ``audio`` / ``video``: a media path, relative to ``media_root`` (default:
  the table's folder);
* ``texts``: one or more fields, each a string or (JSON) a list of strings; CSV cells
  are split on ``text_separator`` when it is given;
* ``labels``: a field with a string, a number or (JSON) a list; CSV cells are split on
  ``label_separator``;
* ``identity``: a person/instance id for identity-level retrieval;
* ``split``: train / val / test (``dev``, ``valid`` and ``validation`` read as val;
  ``split_names`` maps other names); without it, splits are assigned by the pipeline.

Blank values count as missing. An error names the file, the line and the field.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterator

from cmr.data.readers.base import (ReadResult, _check_unique_ids, _iter_jsonl, _label_set, _read_text, _reader,
                                   _unique_texts)
from cmr.data.schema import SPLITS, Item
from cmr.errors import ConfigError, DataError

#: split names other datasets use for the validation split
SPLIT_ALIASES = {"dev": "val", "valid": "val", "validation": "val"}
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}


def _table_file(source: Path) -> Path:
    if source.is_file():
        return source
    found = sorted(p for p in source.glob("*") if p.suffix.lower() in FORMATS) if source.is_dir() else []
    if len(found) != 1:
        raise DataError(str(source), "a .jsonl/.csv/.tsv file, or a folder holding exactly one",
                        f"found {[p.name for p in found]}" if source.is_dir() else "no such file or folder")
    return found[0]


def _rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a JSONL, CSV or TSV file (CSV values are strings; '' is missing)."""
    kind = FORMATS.get(path.suffix.lower())
    if kind == "jsonl":
        yield from _iter_jsonl(path)
        return
    if kind is None:
        raise DataError(str(path), f"a file ending in {', '.join(FORMATS)}", f"got {path.suffix or 'no suffix'}")
    table = csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter="\t" if kind == "tsv" else ",")
    try:
        for row in table:
            # line_num is the line the row ends on; a quoted cell may span lines
            yield table.line_num, {k: (None if v in ("", None) else v) for k, v in row.items() if k is not None}
    except csv.Error as e:
        raise DataError(f"{path}:{table.line_num}", "valid CSV", str(e)) from None


def _strings(value, field: str, where: str, separator: str | None) -> list[str]:
    """``value`` as a list of strings: a list's elements, a string (split on ``separator``), a number."""
    if value is None:
        return []
    if isinstance(value, list):
        out = []
        for v in value:
            out += _strings(v, field, where, None)
        return out
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(where, f"field '{field}' is a string, a number or a list of them", f"got {value!r:.80}")
    text = str(value)
    return [t.strip() for t in text.split(separator)] if separator else [text]


def _one(row: dict, field: str | None, where: str, required: bool = False) -> str | None:
    value = row.get(field) if field else None
    if isinstance(value, str) and not value.strip():
        value = None
    if value is None:
        if required:
            raise DataError(where, f"field '{field}' present", f"field '{field}' is missing or empty; "
                            f"fields here: {', '.join(sorted(row)) or '(none)'}")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(where, f"field '{field}' is a string or an integer", f"got {value!r:.80}")
    return str(value)


def _split(value: str | None, names: dict, where: str, field: str | None) -> str:
    if value is None:
        return ""
    split = names.get(value, SPLIT_ALIASES.get(value.lower(), value.lower()))
    if split not in SPLITS:
        raise DataError(where, f"field '{field}' is one of {', '.join(SPLITS)} (or a name in split_names)",
                        f"got {value!r}")
    return split


@_reader("table")
def read_table(source: Path, id: str = "id", image: str | None = "image", audio: str | None = None,
               video: str | None = None, texts: list[str] | None = None, labels: str | None = None,
               identity: str | None = None, split: str | None = None, split_names: dict | None = None,
               text_separator: str | None = None, label_separator: str | None = None,
               media_root: str | None = None) -> ReadResult:
    """Items from a JSONL/CSV/TSV table whose fields are named by the options (see the module);
    ``texts`` defaults to ``["text"]``."""
    texts = ["text"] if texts is None else texts
    split_names = split_names or {}
    if not texts and not any((image, audio, video)):
        raise ConfigError("reader 'table': name at least one field: texts, image, audio or video")
    bad = {k: v for k, v in split_names.items() if v not in SPLITS}
    if bad:
        raise ConfigError(f"reader 'table': split_names must map to {', '.join(SPLITS)}; got {bad}")
    path = _table_file(source)
    root = Path(media_root) if media_root else path.parent
    kept: list[tuple[int, Item]] = []
    for lineno, row in _rows(path):
        where = f"{path}:{lineno}"
        media = {m: _one(row, f, where, required=True) if f else None
                 for m, f in (("image", image), ("audio", audio), ("video", video))}
        given = [t for f in texts for t in _strings(row.get(f), f, where, text_separator)]
        kept.append((lineno, Item(
            id=_one(row, id, where, required=True),
            split=_split(_one(row, split, where), split_names, where, split),
            # only blank texts: one is kept, so the "texts non-empty" rule reports the row (no silent drop)
            texts=_unique_texts(*given) or tuple(given[:1]),
            labels=tuple(sorted(set(_strings(row.get(labels), labels, where, label_separator)))) if labels else (),
            identity=_one(row, identity, where),
            **media,
        )))
    if not kept:
        raise DataError(str(path), "at least one item", "the table has no rows")
    items = [it for _, it in kept]
    _check_unique_ids(items, str(path), [lineno for lineno, _ in kept])
    return ReadResult(items, root, None, _label_set(items), path.stem, {it.id: f"{path}:{n}" for n, it in kept})
