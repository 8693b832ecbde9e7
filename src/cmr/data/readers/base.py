"""Dataset readers: turn a source folder (or file) into :class:`~cmr.data.schema.Item` lists.

Every reader is registered in :data:`READERS` and called as ``fn(source, **options)``;
it returns a :class:`ReadResult`. Readers keep the source's split when it has one
(``split=""`` otherwise) and never decide train/val/test themselves: that is
:func:`cmr.data.splits.assign_splits`' job, so every dataset is split by the same
leak-free rule. Media paths in items are relative to ``ReadResult.root``.

Bad input (a field of the wrong JSON type, a file that is not UTF-8, no items) raises
:class:`~cmr.errors.DataError` naming the file, the row (line or element number) or key,
and the rule; an unknown option, or one of the wrong type, raises
:class:`~cmr.errors.ConfigError` naming it.

This module holds what every reader shares: the registry, :class:`ReadResult`, the
``@_reader`` decorator with its option check, and the file, JSON and row helpers. The
readers themselves live in the other modules of :mod:`cmr.data.readers`.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from cmr.data.schema import Item
from cmr.errors import ConfigError, DataError
from cmr.registry import Registry, nearest


@dataclass(frozen=True)
class ReadResult:
    """What a reader found.

    ``features`` maps a modality name ("image", "text", ...) to an array of shape
    (N, D_modality); row ``i`` belongs to the item whose ``feature_row`` is ``i``.
    """

    items: list[Item]
    root: Path
    features: dict[str, np.ndarray] | None
    label_set: list[str]
    name: str
    #: item id -> where it was read ("items.jsonl:12"), for errors found after reading
    origins: dict[str, str] | None = None
    #: what the reader left out and why, e.g. {"captions_without_image": 5}; goes into the
    #: prepared dataset's info (the ingest report). Empty when everything was read.
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)


READERS: Registry[Callable[..., ReadResult]] = Registry("reader")


def _option_fits(value, hint) -> bool:
    """True when an option value has the annotated type (str, bool, list[str], X | None)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_option_fits(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        (element,) = typing.get_args(hint)
        return isinstance(value, list) and all(_option_fits(v, element) for v in value)
    if hint is type(None):
        return value is None
    hint = typing.get_origin(hint) or hint  # dict[str, int] -> dict
    return isinstance(value, hint) and (hint is bool or not isinstance(value, bool))


def _describe(hint) -> str:
    """``list[str] | None`` -> 'a list of strings or null'."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).split(' ', 1)[1]}s"
    return {str: "a string", bool: "a boolean (true/false)", int: "an integer", type(None): "null"}.get(hint, str(hint))


def _check_options(name: str, allowed: list[str], hints: dict, options: dict) -> None:
    for key, value in options.items():
        if key not in allowed:
            raise ConfigError(
                f"reader {name!r}: unknown option {key!r}{nearest(key, allowed)}; "
                f"allowed: {', '.join(allowed) or '(none)'}"
            )
        if key in hints and not _option_fits(value, hints[key]):
            raise ConfigError(f"reader {name!r}: option {key}={value!r} must be {_describe(hints[key])}")


def _reader(name: str):
    """Register ``fn(source, *, opt=default, ...)``; an unknown option, or one of the wrong
    type (``caption_files: a.json`` where a list is expected), becomes a ConfigError.
    ``READERS.get(name).check_options(options)`` runs that check alone, before any reading."""

    def decorator(fn):
        allowed = [p for p in inspect.signature(fn).parameters if p != "source"]
        check = functools.partial(_check_options, name, allowed, typing.get_type_hints(fn))

        @functools.wraps(fn)
        def wrapper(source, **options) -> ReadResult:
            check(options)
            return fn(Path(source), **options)

        wrapper.check_options = check
        READERS.register(name)(wrapper)
        return wrapper

    return decorator


# ---------------------------------------------------------------- helpers


def _read_text(path: Path) -> str:
    """The file's text; a missing file or one that is not UTF-8 (UTF-16, binary) is a DataError."""
    if not path.is_file():
        raise DataError(str(path), "file exists", "the reader needs this file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}", "UTF-8 text", f"byte 0x{data[e.start]:02x} at offset {e.start}: {e.reason}") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON-lines file."""
    # newline=None splits lines as reading the file in text mode would (\n, \r\n, \r)
    for lineno, line in enumerate(io.StringIO(_read_text(path), newline=None), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}", "valid JSON", str(e)) from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}", "one JSON object per line")
        yield lineno, row


def _load_json(path: Path):
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(str(path), "valid JSON", str(e)) from None


#: JSON names of Python types, for messages about a field of the wrong type
_JSON_TYPES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list", dict: "an object"}


def _check_type(value, key: str, where: str, kind: type | tuple[type, ...]):
    """``value`` when it is of ``kind`` (a bool is not an integer here), else a DataError
    naming the field and the expected type."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(_JSON_TYPES[k] for k in kinds)
        got = _JSON_TYPES.get(type(value), type(value).__name__)
        raise DataError(where, f"field '{key}' is {expected}", f"got {got}: {json.dumps(value)[:80]}")
    return value


def _require(row: dict, key: str, where: str, kind: type | tuple[type, ...] = str):
    """``row[key]``, present, non-empty and of ``kind``."""
    if row.get(key) in (None, ""):
        raise DataError(where, f"field '{key}' present", f"field '{key}' is missing or empty")
    return _check_type(row[key], key, where, kind)


def _optional(row: dict, key: str, where: str, kind: type | tuple[type, ...] = str):
    """``row[key]`` of ``kind``, or None when it is missing or null."""
    return None if row.get(key) is None else _check_type(row[key], key, where, kind)


def _str_list(row: dict, key: str, where: str) -> list[str]:
    """``row[key]`` as a list of strings; [] when it is missing or null. A bare string is
    an error, not a list of its characters."""
    value = row.get(key)
    if value is None:
        return []
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise DataError(where, f"field '{key}' is a list of strings", f"got {json.dumps(value)[:80]}")
    return value


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(where, "each entry is a JSON object", f"got {_JSON_TYPES.get(type(value), type(value).__name__)}")
    return value


def _list_field(data: dict, key: str, where: str) -> list:
    """``data[key]`` as a list ([] when missing or null)."""
    return _optional(data, key, where, list) or []


def _unique_texts(*texts) -> tuple[str, ...]:
    """Non-empty texts in order, each once (a description equal to the title adds nothing)."""
    out: list[str] = []
    for t in texts:
        if isinstance(t, str) and t.strip() and t not in out:
            out.append(t)
    return tuple(out)


def _label_set(items: list[Item]) -> list[str]:
    """Sorted labels; numeric labels in numeric order ("2" before "10")."""
    labels = {label for it in items for label in it.labels}
    return sorted(labels, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))


def _check_unique_ids(items: list[Item], where: str, lines: list[int] | list[str] | None = None) -> None:
    """DataError for the first id given twice; with ``lines`` (each item's line in ``where``, or
    its place in a JSON file such as ``images[3]``), naming both places."""
    seen: dict[str, int] = {}
    for k, it in enumerate(items):
        if it.id in seen:
            if lines is None:
                raise DataError(where, "ids unique", f"item id {it.id!r} occurs twice")
            first, again = lines[seen[it.id]], lines[k]
            both = f"lines {first} and {again}" if isinstance(again, int) else f"{first} and {again}"
            raise DataError(f"{where}:{again}", "ids unique", f"item id {it.id!r} occurs twice ({both})")
        seen[it.id] = k


def _from_items_jsonl(source: Path, to_item: Callable[[dict, str], Item | None]) -> ReadResult:
    """Read ``source/items.jsonl`` (the shared-datasets layout) with ``to_item(row, where)``;
    a None from ``to_item`` drops the row; a file that gives no item is a DataError."""
    path = source / "items.jsonl"
    rows = list(_iter_jsonl(path))
    kept = [(lineno, it) for lineno, row in rows if (it := to_item(row, f"{path}:{lineno}")) is not None]
    if not kept:
        raise DataError(str(path), "at least one item", f"{len(rows)} row(s), none kept" if rows else "the file is empty")
    items = [it for _, it in kept]
    _check_unique_ids(items, str(path), [lineno for lineno, _ in kept])
    return ReadResult(items, source, None, _label_set(items), source.name,
                      {it.id: f"{path}:{lineno}" for lineno, it in kept})


def _one_file(source: Path, pattern: str) -> Path:
    """``source`` itself, or the single file matching ``pattern`` inside the folder ``source``."""
    if source.is_file():
        return source
    found = sorted(source.glob(pattern))
    if len(found) != 1:
        raise DataError(str(source), f"exactly one {pattern}", f"found {len(found)}: {[p.name for p in found]}")
    return found[0]
