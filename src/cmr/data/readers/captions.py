"""Readers of image-caption datasets in their published layouts: COCO captions, Flickr8k,
Karpathy split JSON."""
from __future__ import annotations

import io
import os
import re
from collections import defaultdict
from pathlib import Path

from cmr.data.readers.base import (
    ReadResult, _check_unique_ids, _iter_jsonl, _list_field, _load_json, _object, _one_file, _optional, _read_text,
    _reader, _require, _str_list, _unique_texts,
)
from cmr.data.schema import Item
from cmr.data.splits import normalise_caption
from cmr.errors import DataError


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
