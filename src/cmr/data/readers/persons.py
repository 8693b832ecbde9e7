"""Readers of person-search datasets, where items carry an identity: CUHK-PEDES."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from cmr.data.readers.base import (
    ReadResult, _check_unique_ids, _load_json, _object, _optional, _reader, _require, _unique_texts,
)
from cmr.data.schema import SPLITS, Item
from cmr.errors import DataError


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
