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
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import json
import os
import re
import types
import typing
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from cmr.data.schema import SPLITS, Item
from cmr.data.splits import normalise_caption
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


# ---------------------------------------------------------------- openclipart

#: Titles that name a collection or a theme rather than the picture (counts in the
#: 6,843-item source: gramastar 1,375, Lemon SVG theme 411, card 226, ...). Such a
#: caption is shared by hundreds of unrelated pictures and teaches nothing.
COLLECTION_TITLES = frozenset(
    t.casefold()
    for t in (
        "gramastar",
        "Lemon SVG theme",
        "card",
        "AIGA_Symbol_Signs",
        "Various Cliparts",
        "Etiquette Icons",
        "SVG Road Signs",
        "gold-theme",
        "R16 sibmission",
        "blueberry - iconset",
        "plastik-icon-theme",
        "Sallite",
    )
)
#: Title prefixes of collections ("Part of the Flat Icon Collection (Wed Aug 25 ...)",
#: "Clipart by Nicu Buculei - jigsaw_red_10"): the rest is a date or a file name.
COLLECTION_TITLE_PREFIXES = ("part of the flat icon collection", "clipart by nicu buculei - ")


#: Descriptions that say nothing about the picture: a bare e-mail address (118 items of
#: one author), a collection note, or the licence boilerplate some authors pasted in.
_NON_DESCRIPTIVE = re.compile(
    r"^\S+@\S+\.\w+$|^part of .* collection$|^this work is hereby released into the public domain",
    re.IGNORECASE,
)


def is_collection_title(title: str | None) -> bool:
    """True when an openclipart title names a collection, not the picture."""
    if not title:
        return False
    t = title.strip().casefold()
    return t in COLLECTION_TITLES or t.startswith(COLLECTION_TITLE_PREFIXES)


@_reader("openclipart")
def read_openclipart(source: Path, keep_collection_titles: bool = False) -> ReadResult:
    """Folder with ``items.jsonl`` (fields id, image, title, description, category,
    also_linked_as, keywords, ...) and ``images/``.

    texts = title, then the description when present, different and descriptive (not an
    e-mail address, collection note or licence text); labels = the
    category plus the categories of the symbolic links (``also_linked_as``), so a
    frog filed under animals and signs_and_symbols has both labels.
    """

    def to_item(row: dict, where: str) -> Item | None:
        title, description = _optional(row, "title", where), _optional(row, "description", where)
        if not keep_collection_titles and is_collection_title(title):
            return None
        if not (title or description):
            raise DataError(where, "title or description present", "both are missing")
        if description and _NON_DESCRIPTIVE.match(description.strip()):
            description = None
        texts = _unique_texts(title, description)
        if not texts and title and not title.strip():
            # a blank title (spaces only) and nothing else: kept without texts, so the
            # "texts non-empty" rule reports it (or drops it, data.on_invalid: drop)
            return Item(id=_require(row, "id", where), split="", image=_optional(row, "image", where))
        if not texts:
            return None  # only a non-descriptive description: no caption to learn from
        labels = {_require(row, "category", where)}
        labels |= {linked.split("/", 1)[0] for linked in _str_list(row, "also_linked_as", where)}
        return Item(
            id=_require(row, "id", where),
            split="",
            texts=texts,
            labels=tuple(sorted(labels)),
            image=_require(row, "image", where),
            meta={"keywords": _str_list(row, "keywords", where), "subcategory": _optional(row, "subcategory", where)},
        )

    return _from_items_jsonl(source, to_item)


# ---------------------------------------------------------------- tuxpaint


@_reader("tuxpaint")
def read_tuxpaint(source: Path, audio_field: str = "sound") -> ReadResult:
    """Tux Paint stamps: texts = ``text_en``, labels = ``category``, image, and audio from
    ``audio_field`` (``sound``: the stamp's sound effect; ``spoken_en``: the spoken
    description). Most stamps have neither, so ``audio`` is often None."""
    if audio_field not in ("sound", "spoken_en"):
        raise ConfigError(f"reader 'tuxpaint': option audio_field={audio_field!r}; allowed: 'sound', 'spoken_en'")
    return _from_items_jsonl(
        source,
        lambda row, where: Item(
            id=_require(row, "id", where),
            split="",
            texts=_unique_texts(_require(row, "text_en", where)),
            labels=(_require(row, "category", where),),
            image=_require(row, "image", where),
            audio=_optional(row, audio_field, where),
            meta={"subcategory": _optional(row, "subcategory", where)},
        ),
    )


# ---------------------------------------------------------------- gcompris


@_reader("gcompris")
def read_gcompris(source: Path) -> ReadResult:
    """GCompris pictures: texts = the non-null of text, title, text2; labels = ``set``;
    audio = ``sound`` (only instruments, farm animals and world music have one)."""
    return _from_items_jsonl(
        source,
        lambda row, where: Item(
            id=_require(row, "id", where),
            split="",
            texts=_unique_texts(*(_optional(row, key, where) for key in ("text", "title", "text2"))),
            labels=(_require(row, "set", where),),
            image=_require(row, "image", where),
            audio=_optional(row, "sound", where),
            meta={"image_license": _optional(row, "image_license", where)},
        ),
    )


# ---------------------------------------------------------------- COCO captions


def _split_from_name(name: str, where: str) -> str:
    for split in ("train", "val", "test"):
        if name.startswith(split):
            return split
    raise DataError(where, "split named train*/val*/test*", f"cannot tell the split of {name!r}")


@_reader("coco")
def read_coco(source: Path) -> ReadResult:
    """COCO captions: ``annotations/captions_<name>.json`` (e.g. ``captions_train2017.json``)
    with the images of ``<name>`` in ``<source>/<name>/`` or ``<source>/images/<name>/``.

    One item per image with at least one caption; texts = its captions in annotation-id
    order; split from ``<name>`` (train*/val*). Item id = ``<name>/<image id>``.
    """
    files = sorted((source / "annotations").glob("captions_*.json"))
    if not files:
        raise DataError(str(source / "annotations"), "captions_<split>*.json present", "no caption file found")
    items, origins = [], {}
    skipped: dict[str, int] = defaultdict(int)
    for path in files:
        name = path.stem.removeprefix("captions_")
        split = _split_from_name(name, str(path))
        image_dir = next((d for d in (Path(name), Path("images") / name) if (source / d).is_dir()), None)
        if image_dir is None:
            raise DataError(str(source / name), "image folder exists", f"neither {name}/ nor images/{name}/ exists")
        data = _object(_load_json(path), str(path))
        # image id -> (annotation id, position in "annotations", caption) of each of its captions
        captions: dict[object, list[tuple[int, int, str]]] = defaultdict(list)
        for k, ann in enumerate(_list_field(data, "annotations", str(path))):
            where = f"{path}:annotations[{k}]"
            image_id = _require(_object(ann, where), "image_id", where, (int, str))
            ann_id = _optional(ann, "id", where, int)
            captions[image_id].append((k if ann_id is None else ann_id, k, _require(ann, "caption", where)))
        found, places = [], []
        for k, img in enumerate(_list_field(data, "images", str(path))):
            where = f"{path}:images[{k}]"
            image_id = _require(_object(img, where), "id", where, (int, str))
            if image_id not in captions:
                continue  # an image without captions cannot be a retrieval pair
            image = image_dir / _require(img, "file_name", where)
            if not (source / image).is_file():  # a caption file for all of val2017, a folder with part of it
                skipped["images_missing"] += 1
                skipped["captions_without_image"] += len(captions[image_id])
                continue
            own = sorted(captions[image_id])
            found.append(Item(id=f"{name}/{image_id}", split=split, image=image.as_posix(),
                              texts=_unique_texts(*(c.strip() for _, _, c in own))))
            places.append(f"images[{k}]")
            # where a user looks for the item: its image entry and the entries of its captions
            origins[found[-1].id] = f"{where} (annotations[{', '.join(str(at) for _, at, _ in own)}])"
        _check_unique_ids(found, str(path), places)
        items += found
    if not items:
        raise DataError(
            str(source / "annotations"), "at least one captioned image exists in its image folder",
            f"none of {skipped['images_missing']} captioned image(s) was found",
        )
    return ReadResult(items, source, None, [], source.name, origins, skipped=dict(skipped))


# ---------------------------------------------------------------- Flickr8k

#: the standard Flickr8k split lists; ``dev`` is the validation split
FLICKR8K_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                        "test": "Flickr_8k.testImages.txt"}
#: where the images are looked for, relative to the token file's folder: the official
#: archive's (misspelt) folder name first
FLICKR8K_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "images", "../images")
#: ``<image file>#<n><TAB><caption>``; some copies have a space instead of the TAB
_TOKEN_LINE = re.compile(r"(?P<image>\S+)#(?P<n>\d+)\s+(?P<caption>\S.*)")
#: a caption shared by items of two splits stays in the later one here, so the test
#: split keeps its 5 captions per image (the published protocol) and nothing leaks
_SPLIT_PRIORITY = {"test": 0, "val": 1, "train": 2}


def _flickr8k_standard(source: Path, image_dir: str | None) -> tuple[Path, list[tuple[str, str | None, list[str]]]]:
    """(image root, [(image file, split or None, captions)]) from ``Flickr8k.token.txt`` and
    the three split lists in ``source``."""
    token_path = source / "Flickr8k.token.txt"
    captions: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for lineno, line in enumerate(io.StringIO(_read_text(token_path), newline=None), 1):
        if not line.strip():
            continue
        m = _TOKEN_LINE.fullmatch(line.strip())
        if m is None:
            raise DataError(f"{token_path}:{lineno}", "<image file>#<n><TAB><caption>", f"got {line.strip()[:80]!r}")
        captions[m["image"]].append((int(m["n"]), m["caption"].strip()))
    split_of: dict[str, str] = {}
    for split, name in FLICKR8K_SPLIT_FILES.items():
        for lineno, line in enumerate(io.StringIO(_read_text(source / name), newline=None), 1):
            if line.strip() in split_of:
                raise DataError(f"{source / name}:{lineno}", "each image in one split list",
                                f"{line.strip()!r} is also in the {split_of[line.strip()]} list")
            if line.strip():
                split_of[line.strip()] = split
    dirs = [image_dir] if image_dir is not None else [d for d in FLICKR8K_IMAGE_DIRS if (source / d).is_dir()]
    if not dirs or not (source / dirs[0]).is_dir():
        raise DataError(str(source), "image folder exists",
                        f"none of {list(FLICKR8K_IMAGE_DIRS) if image_dir is None else [image_dir]} is a folder; "
                        "set the reader option image_dir")
    root = Path(os.path.normpath(source / dirs[0]))
    rows = [(image, split_of.get(image), [c for _, c in sorted(caps, key=lambda nc: nc[0])]) for image, caps in captions.items()]
    rows += [(image, split, []) for image, split in split_of.items() if image not in captions]
    return root, rows


def _flickr8k_items_jsonl(source: Path) -> list[tuple[str, str | None, list[str]]]:
    """[(image path, split or None, captions)] from the shared-datasets ``items.jsonl``."""
    rows = []
    for lineno, row in _iter_jsonl(source / "items.jsonl"):
        where = f"{source / 'items.jsonl'}:{lineno}"
        split = _optional(row, "split", where)
        if split not in (None, "train", "dev", "test"):
            raise DataError(where, "split is train, dev, test or null", f"split is {split!r}")
        rows.append((_require(row, "image", where), "val" if split == "dev" else split, _str_list(row, "texts", where)))
    return rows


@_reader("flickr8k")
def read_flickr8k(source: Path, image_dir: str | None = None, keep_shared_captions: bool = False) -> ReadResult:
    """Flickr8k, its own split kept (``dev`` -> val): one item per image, texts = its
    captions in the order ``#0..#4`` (a caption an image has twice is kept twice, so the
    test split has the 1,000 x 5,000 captions of the published protocol).

    Two layouts: the standard ``Flickr8k.token.txt`` + ``Flickr_8k.{train,dev,test}Images.txt``
    in ``source`` with the images in ``image_dir`` (relative to ``source``; default: the first
    of :data:`FLICKR8K_IMAGE_DIRS` that exists), or the shared-datasets ``items.jsonl``
    (``id``, ``image``, ``texts``, ``split`` train/dev/test/null). Item id = file name without
    ``.jpg``.

    Left out and counted in ``ReadResult.skipped``: captions whose image file is missing,
    images in no split list, listed images without captions, and (unless
    ``keep_shared_captions``) the copies of a caption that items of two splits share, kept
    only in the later of test > val > train (84 captions of the real set, e.g. "a black dog
    runs through the water ."), which the leakage rule would otherwise flag.
    """
    if (source / "items.jsonl").is_file():
        root, rows = source, _flickr8k_items_jsonl(source)
    else:
        root, rows = _flickr8k_standard(source, image_dir)
    skipped: dict[str, int] = defaultdict(int)
    kept = []
    for image, split, texts in rows:
        texts = [t.strip() for t in texts if t.strip()]
        if not texts:
            skipped["listed_images_without_captions"] += 1
        elif not (root / image).is_file():
            skipped["images_missing"] += 1
            skipped["captions_without_image"] += len(texts)
        elif split is None:
            skipped["images_in_no_split"] += 1
        else:
            kept.append((image, split, texts))
    if not keep_shared_captions:
        first = {}
        for _, split, texts in kept:
            for t in texts:
                key = normalise_caption(t)
                first[key] = min(first.get(key, 9), _SPLIT_PRIORITY[split])
        pruned = []
        for image, split, texts in kept:
            left = [t for t in texts if first[normalise_caption(t)] == _SPLIT_PRIORITY[split]]
            if len(left) < len(texts):
                skipped[f"{split}_captions_shared_with_a_later_split"] += len(texts) - len(left)
            if left:
                pruned.append((image, split, left))
            else:
                skipped["images_without_captions_left"] += 1
        kept = pruned
    items = [Item(id=Path(image).name.removesuffix(".jpg"), split=split, texts=tuple(texts), image=image)
             for image, split, texts in sorted(kept)]
    if not items:
        raise DataError(str(source), "at least one captioned image in a split list exists", f"skipped {dict(skipped)}")
    _check_unique_ids(items, str(source))
    return ReadResult(items, root, None, [], "flickr8k", skipped=dict(sorted(skipped.items())))


# ---------------------------------------------------------------- Karpathy split JSON


@_reader("karpathy")
def read_karpathy(source: Path, image_root: str | None = None) -> ReadResult:
    """Karpathy split file ``dataset_<name>.json`` (COCO, Flickr8k/30k): ``images[]`` with
    ``filepath`` (optional), ``filename``, ``split`` and ``sentences[].raw``.

    ``restval`` is counted as train (as in the usual 113k COCO training set) and kept in
    ``meta["karpathy_split"]``. Media paths are ``<filepath>/<filename>`` relative to
    ``image_root`` (relative to the JSON's folder; default: that folder).
    """
    path = _one_file(source, "dataset_*.json")
    root = path.parent / image_root if image_root else path.parent
    data = _object(_load_json(path), str(path))
    items, places = [], []
    for k, img in enumerate(_list_field(data, "images", str(path))):
        where = f"{path}:images[{k}]"
        places.append(f"images[{k}]")
        split = _require(_object(img, where), "split", where)
        if split not in ("train", "restval", "val", "test"):
            raise DataError(where, "split in train/restval/val/test", f"split is {split!r}")
        filename = _require(img, "filename", where)
        filepath = _optional(img, "filepath", where)
        rel = f"{filepath}/{filename}" if filepath else filename
        raw = []
        for j, sentence in enumerate(_list_field(img, "sentences", where)):
            w = f"{where}.sentences[{j}]"
            raw.append((_optional(_object(sentence, w), "raw", w) or "").strip())
        texts = _unique_texts(*raw)
        meta = {"karpathy_split": split} if split == "restval" else {}
        imgid = _optional(img, "imgid", where, (int, str))
        items.append(
            Item(
                id=str(rel if imgid is None else imgid),
                split="train" if split == "restval" else split,
                texts=texts,
                image=rel,
                meta=meta,
            )
        )
    _check_unique_ids(items, str(path), places)
    return ReadResult(items, root, None, [], path.stem.removeprefix("dataset_"),
                      {it.id: f"{path}:{place}" for it, place in zip(items, places)})


# ---------------------------------------------------------------- precomputed features


def _features_result(
    per_split: dict[str, dict[str, np.ndarray]],
    labels: dict[str, np.ndarray],
    row_meta: dict[str, dict[str, np.ndarray]],
    categories: list[str] | None,
    where: str,
    name: str,
    root: Path,
    origin: Callable[[str, int], str],
) -> ReadResult:
    """Stack per-split modality arrays into one (N, D) array per modality; items in split order.
    ``origin(split, i)`` says where row ``i`` of ``split`` was read, for errors found later."""
    modalities = sorted({m for arrays in per_split.values() for m in arrays})
    items: list[Item] = []
    origins: dict[str, str] = {}
    stacked: dict[str, list[np.ndarray]] = {m: [] for m in modalities}
    for split in (s for s in SPLITS if s in per_split):
        arrays = per_split[split]
        for m in modalities:
            if m not in arrays:
                raise DataError(where, "every split has every modality", f"'{split}_{m}' is missing")
        split_labels = np.asarray(labels[split])
        if split_labels.ndim != 1:
            raise DataError(where, "labels are a 1-D array", f"'{split}_label' has shape {split_labels.shape}")
        if categories is not None:
            if not np.issubdtype(split_labels.dtype, np.integer):
                raise DataError(where, "labels are integers 0..C-1", f"'{split}_label' has dtype {split_labels.dtype}")
            bad = split_labels[(split_labels < 0) | (split_labels >= len(categories))]
            if bad.size:
                raise DataError(where, "labels are integers 0..C-1", f"'{split}_label' holds {bad[0]}, C = {len(categories)}")
        n = len(split_labels)
        for m, arr in arrays.items():
            if arr.ndim != 2 or arr.shape[0] != n:
                raise DataError(where, "one feature row per label", f"'{split}_{m}' has shape {arr.shape}, {n} labels")
            stacked[m].append(arr)
        for key, values in row_meta.get(split, {}).items():
            if np.ndim(values) != 1 or len(values) != n:
                raise DataError(where, "one value per label", f"'{split}_{key}' has shape {np.shape(values)}, {n} labels")
        for i in range(n):
            raw = labels[split][i]
            label = categories[int(raw)] if categories is not None else str(raw)
            meta = {key: str(values[i]) for key, values in row_meta.get(split, {}).items()}
            items.append(
                Item(id=f"{split}/{i:04d}", split=split, labels=(label,), feature_row=len(items), meta=meta)
            )
            origins[items[-1].id] = origin(split, i)
    dims = {m: {a.shape[1] for a in stacked[m]} for m in modalities}
    for m, d in dims.items():
        if len(d) != 1:
            raise DataError(where, "one feature dim per modality", f"'{m}' has dims {sorted(d)} across splits")
    features = {m: np.concatenate(stacked[m]) for m in modalities}
    label_set = list(categories) if categories is not None else _label_set(items)
    return ReadResult(items, root, features, label_set, name, origins)


@_reader("features_npz")
def read_features_npz(source: Path, splits: list[str] | None = None) -> ReadResult:
    """Precomputed features in one ``.npz`` (the wikipedia_cmr layout): ``<split>_<modality>``
    float arrays (N, D), ``<split>_label`` (N,) ints, optional ``categories`` (C,) names
    (label k -> categories[k]); other (N,) ``<split>_*`` arrays go to ``meta``.

    ``splits`` restricts reading to some splits (e.g. ``["test"]`` where a split lacks a
    modality, as in pascal_sentence_partial).
    """
    path = _one_file(source, "*.npz")
    per_split: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    labels: dict[str, np.ndarray] = {}
    row_meta: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    with np.load(path, allow_pickle=False) as z:
        categories = [str(c) for c in z["categories"]] if "categories" in z.files else None
        for key in z.files:
            split, _, field = key.partition("_")
            if split not in SPLITS or not field or (splits is not None and split not in splits):
                continue
            arr = z[key]
            if field == "label":
                labels[split] = arr
            elif arr.ndim == 2 and np.issubdtype(arr.dtype, np.number):
                per_split[split][field] = arr
            else:
                row_meta[split][field] = arr
    for split in per_split:
        if split not in labels:
            raise DataError(str(path), "every split has labels", f"'{split}_label' is missing")
    if not per_split:
        raise DataError(str(path), "arrays named <split>_<modality>", f"found {sorted(labels)} only")
    # an .npz has no lines: row i of every <split>_* array
    return _features_result(per_split, labels, row_meta, categories, str(path), path.stem, path.parent,
                            lambda split, i: f"{path}:{split}_*[{i}]")


@_reader("features_mat")
def read_features_mat(source: Path) -> ReadResult:
    """The original Wikipedia CMR files: ``raw_features.mat`` (I_tr, T_tr, I_te, T_te; one
    row per sample) beside ``trainset_txt_img_cat.list`` / ``testset_txt_img_cat.list``
    (tab-separated text id, image id, class 1..C; line i = row i) and ``categories.list``.
    ``source`` is that folder or the ``.mat`` file in it."""
    from scipy.io import loadmat

    mat_path = _one_file(source, "*.mat")
    folder = mat_path.parent
    mat = loadmat(mat_path)
    categories = _read_text(folder / "categories.list").split()
    per_split, labels, row_meta, lines = {}, {}, {}, {}
    for split, suffix, list_name in (("train", "tr", "trainset_txt_img_cat.list"), ("test", "te", "testset_txt_img_cat.list")):
        list_path = folder / list_name
        numbered = [(n, line.split("\t")) for n, line in enumerate(_read_text(list_path).splitlines(), 1)
                    if line.strip()]
        for lineno, r in numbered:
            if len(r) != 3 or not r[2].strip().isdigit() or not 1 <= int(r[2]) <= len(categories):
                raise DataError(f"{list_path}:{lineno}", "text id<TAB>image id<TAB>class 1..C", repr(r))
        for key in (f"I_{suffix}", f"T_{suffix}"):
            if key not in mat:
                raise DataError(str(mat_path), f"variable {key} present", f"variables: {sorted(mat)}")
        rows = [r for _, r in numbered]
        per_split[split] = {"image": np.asarray(mat[f"I_{suffix}"]), "text": np.asarray(mat[f"T_{suffix}"])}
        labels[split] = np.array([int(r[2]) - 1 for r in rows])
        row_meta[split] = {"text_id": np.array([r[0] for r in rows]), "image_id": np.array([r[1] for r in rows])}
        lines[split] = [f"{list_path}:{lineno}" for lineno, _ in numbered]
    # row i of I_tr / T_tr is the i-th entry of the split's list file: name its line
    return _features_result(per_split, labels, row_meta, categories, str(mat_path), mat_path.stem, folder,
                            lambda split, i: lines[split][i])


# ---------------------------------------------------------------- CUHK-PEDES


def _captions_list(value, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(c, str) for c in value):
        return value
    raise DataError(where, "captions is a string or a list of strings", f"got {type(value).__name__}")


def _pedes_item(stem: str, entries: list[tuple[str, dict]], image_dir: str, identity_prefix: str) -> Item:
    """One item per image; ``entries`` are (where, element) of that image, in file order."""
    where, first = entries[0]
    file_path = _require(first, "file_path", where)
    texts: list[str] = []
    captions_bt: list[str] = []
    for w, e in entries:
        texts += _captions_list(_require(e, "captions", w, (str, list)), w)
        if e.get("captions_bt"):
            captions_bt += _captions_list(e["captions_bt"], w)
    split = _optional(first, "split", where)
    if split and split not in SPLITS:
        raise DataError(where, "split in train/val/test", f"split is {split!r}")
    split = split or next((s for s in SPLITS if s in stem), "")
    meta = {"captions_bt": captions_bt} if captions_bt else {}
    return Item(
        id=f"{stem}/{Path(file_path).with_suffix('').as_posix()}" if stem else Path(file_path).with_suffix("").as_posix(),
        split=split,
        texts=_unique_texts(*texts),
        identity=f"{identity_prefix}{_require(first, 'id', where, (int, str))}",
        image=(Path(image_dir) / file_path).as_posix() if image_dir else file_path,
        meta=meta,
    )


@_reader("cuhk_pedes")
def read_cuhk_pedes(
    source: Path,
    image_dir: str | None = None,
    caption_files: list[str] | None = None,
    skip_missing_images: bool = False,
) -> ReadResult:
    """CUHK-PEDES person search: identity = person id, texts = captions.

    Two layouts:

    * ``reid_raw.json`` (``source`` is the file or its folder): a list of
      ``{file_path, id, captions: [..], split, captions_bt?}``; back-translated captions go
      to ``meta["captions_bt"]``. Images under ``image_dir`` (default ``imgs`` if that
      folder exists, else the JSON's folder).
    * caption files (``source/captions/*.json``, as in cuhk_pedes_sample): lists of
      ``{id, file_path, captions: str, split?}``, one element per caption or per image;
      elements of the same image in one file are merged. Split from ``split`` or the file
      name. Person ids are numbered per file family, so identity is ``<file>:<id>``.
      Images under ``image_dir`` (default ``images``).

    ``caption_files`` picks caption files by name; ``skip_missing_images`` drops entries
    whose image is absent (the sample holds only the CUHK01 images) instead of failing.
    """
    reid = source if source.is_file() else source / "reid_raw.json"
    if reid.is_file():
        root = reid.parent
        default_dir = "imgs" if (root / "imgs").is_dir() else ""
        files = [(reid, "", "")]
    else:
        root = source
        default_dir = "images"
        caption_dir = source / "captions"
        paths = [caption_dir / n for n in caption_files] if caption_files else sorted(caption_dir.glob("*.json"))
        if not paths:
            raise DataError(str(source), "reid_raw.json or captions/*.json present", "found neither")
        files = [(p, p.stem, f"{p.stem}:") for p in paths]
    image_dir = default_dir if image_dir is None else image_dir
    items = []
    for path, stem, identity_prefix in files:
        data = _load_json(path)
        if not isinstance(data, list):
            raise DataError(str(path), "a JSON list of entries", f"got {type(data).__name__}")
        by_image: dict[str, list[tuple[str, dict]]] = defaultdict(list)
        for k, e in enumerate(data):
            where = f"{path}:[{k}]"
            file_path = _require(_object(e, where), "file_path", where)
            if not (root / image_dir / file_path).is_file():
                if skip_missing_images:
                    continue
                raise DataError(where, "image exists", f"file_path {file_path!r} not under {root / image_dir}")
            by_image[file_path].append((where, e))
        items += [_pedes_item(stem, entries, image_dir, identity_prefix) for entries in by_image.values()]
    _check_unique_ids(items, str(source))
    return ReadResult(items, root, None, [], source.stem if source.is_file() else source.name)


# Audio and video readers live in their own module; importing it here registers them, so
# every caller of READERS (the ingest stage, `cmr list readers`) sees them.
from cmr.data import av_readers  # noqa: E402,F401
# Readers in other modules register themselves when imported; importing them here means
# that whoever reads READERS sees every reader.
from cmr.data import table_reader  # noqa: E402,F401  (the generic JSONL/CSV reader)
