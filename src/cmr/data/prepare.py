"""Read a source with a registered reader, assign leak-free splits, save and load the result.

A prepared dataset is a folder::

    items.jsonl    one Item per line (line n = row n in validation reports)
    dataset.json   root (media paths are relative to it), label_set, info
    features.npz   precomputed features, one (N, D) array per modality (when present)
    origins.json   item id -> the source file:line it was read from (readers that know it)
    dropped.json   what ``data.on_invalid: drop`` removed, and why (:mod:`cmr.data.invalid`)

``info["data_version"]`` is a SHA-256 over the items, the bytes of every media file
they name and the feature arrays: equal versions mean equal data.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmr.data.invalid import ON_INVALID, drop_invalid
from cmr.data.readers import READERS
from cmr.data.schema import Item, read_items, write_items
from cmr.data.splits import MEDIA_FIELDS, assign_splits, file_sha256, split_counts
from cmr.data.stored_features import open_npz_member
from cmr.errors import ConfigError, DataError
from cmr.io import atomic_path, read_json, write_json
from cmr.progress import progress


@dataclass(frozen=True)
class Prepared:
    """Items with their splits; ``features[m]`` has shape (N, D_m), row = ``Item.feature_row``
    (an ``np.ndarray``, or from :func:`load_prepared` a :class:`~cmr.data.stored_features.StoredArray`
    that reads the rows it is indexed with)."""

    items: list[Item]
    root: Path
    features: dict[str, np.ndarray] | None
    label_set: list[str]
    info: dict
    #: item id -> source file:line, for errors that name the user's file rather than items.jsonl
    origins: dict[str, str] | None = None
    #: report rows of what ``on_invalid="drop"`` removed (:func:`cmr.data.invalid.drop_invalid`)
    dropped: list[dict] | None = None


def data_version(items: list[Item], root: Path, features: dict[str, np.ndarray] | None) -> str:
    """SHA-256 hex of the items (JSON, in order), the media file contents and the features."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps(it.to_json(), sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    media = sorted({rel for it in items for rel in (getattr(it, f) for f in MEDIA_FIELDS) if rel})
    for rel in progress(media, len(media), "hashing media files", unit="file"):
        path = root / rel
        h.update(f"{rel}\x00{file_sha256(path) if path.is_file() else 'missing'}\n".encode())
    for name in sorted(features or {}):
        arr = np.ascontiguousarray(features[name])
        h.update(f"{name}\x00{arr.dtype.str}\x00{arr.shape}\n".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def prepare_dataset(
    reader: str,
    source: str | Path,
    options: dict,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    *,
    on_invalid: str = "fail",
    min_text_chars: int = 1,
    max_text_chars: int = 1 << 30,
) -> Prepared:
    """Read ``source`` with ``READERS[reader](source, **options)`` and assign splits
    (:func:`cmr.data.splits.assign_splits`); a split left empty is a DataError.

    ``on_invalid="drop"`` first removes texts and items that break the per-item rules
    (with the text length limits given), reporting each (:mod:`cmr.data.invalid`).
    """
    if on_invalid not in ON_INVALID:
        raise ConfigError(f"data.on_invalid: {on_invalid!r} is not one of {', '.join(ON_INVALID)}")
    try:
        read = READERS.get(reader)
    except KeyError as e:
        raise ConfigError(f"data.reader: {e.args[0]}") from None
    result = read(Path(source), **dict(options))
    read_items_, dropped = result.items, None
    if on_invalid == "drop":
        read_items_, dropped = drop_invalid(result.items, result.root, min_text_chars, max_text_chars, result.origins)
    items = assign_splits(
        read_items_, val_fraction, test_fraction, seed, root=result.root, features=result.features, where=str(source)
    )
    _check_split_sizes(items, val_fraction, test_fraction, str(source))
    features = result.features
    info = {
        "name": result.name,
        "reader": reader,
        "source": str(source),
        "options": dict(options),
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
        "counts": split_counts(items),
        "n_texts": split_counts(it for it in items for _ in it.texts),
        "feature_dims": {m: int(a.shape[1]) for m, a in sorted((features or {}).items())},
        "data_version": data_version(items, result.root, features),
    }
    if dropped is not None:
        info["dropped"] = {"texts": sum(d["dropped"] == "text" for d in dropped),
                           "items": sum(d["dropped"] == "item" for d in dropped)}
    if result.skipped:  # what the reader left out (captions without an image, ...), counted
        info["skipped"] = dict(result.skipped)
    return Prepared(items, result.root, features, list(result.label_set), info, result.origins, dropped)


def _check_split_sizes(items: list[Item], val_fraction: float, test_fraction: float, where: str) -> None:
    """Train, and val and test unless their fraction is 0, each hold at least one item:
    training, model selection and evaluation each need one, and a run would otherwise
    fail stages later (or replace a good prepared dataset with an empty one)."""
    counts = split_counts(items)
    needed = ["train"] + [s for s, f in (("val", val_fraction), ("test", test_fraction)) if f > 0]
    if any(counts[s] < 1 for s in needed):
        raise DataError(
            where,
            f"every split ({', '.join(needed)}) has at least one item",
            f"{len(items)} item(s) read, split {counts} with val_fraction={val_fraction}, "
            f"test_fraction={test_fraction}; a source this small needs more items",
        )


def _portable(root: Path) -> str:
    """``root`` relative to the working directory when it can be, so the folder is portable."""
    try:
        return Path(os.path.relpath(Path(root).resolve(), Path.cwd().resolve())).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        return str(Path(root).resolve())


def save_prepared(p: Prepared, out_dir: str | Path) -> Path:
    """Write ``out_dir`` (items.jsonl, dataset.json, features.npz) atomically; returns it."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        write_items(tmp / "items.jsonl", p.items)
        if p.features:
            with open(tmp / "features.npz", "wb") as f:
                np.savez(f, **p.features)
        if p.origins:
            write_json(tmp / "origins.json", p.origins)
        if p.dropped is not None:
            write_json(tmp / "dropped.json", p.dropped)
        write_json(
            tmp / "dataset.json",
            {"root": _portable(p.root), "label_set": list(p.label_set), "features": sorted(p.features or {}), "info": p.info},
        )
    return out_dir


def load_prepared(out_dir: str | Path) -> Prepared:
    """Read a folder written by :func:`save_prepared` (root resolved against the working directory).

    ``features[m]`` is a :class:`cmr.data.stored_features.StoredArray` (indexing reads only the
    rows asked for from ``features.npz``; ``np.asarray`` reads it whole), or an ``np.ndarray``
    where the member is compressed or empty."""
    out_dir = Path(out_dir)
    meta_path = out_dir / "dataset.json"
    if not meta_path.is_file():
        raise DataError(str(meta_path), "file exists", "not a prepared dataset folder")
    meta = read_json(meta_path)
    for key in ("root", "label_set", "features", "info"):
        if key not in meta:
            raise DataError(str(meta_path), f"field '{key}' present")
    features = None
    if meta["features"]:
        npz = out_dir / "features.npz"
        if not npz.is_file():
            raise DataError(str(npz), "file exists", f"dataset.json lists features {meta['features']}")
        with np.load(npz, allow_pickle=False) as z:
            missing = sorted(set(meta["features"]) - set(z.files))
        if missing:
            raise DataError(str(npz), "holds every array dataset.json lists", f"missing {missing}")
        # read from disk per indexing call, so an encode in shards holds one shard's rows
        features = {m: open_npz_member(npz, m) for m in meta["features"]}
    items = read_items(out_dir / "items.jsonl")
    origins = read_json(out_dir / "origins.json", dict) if (out_dir / "origins.json").is_file() else None
    return Prepared(items, Path(meta["root"]), features, list(meta["label_set"]), meta["info"], origins)
