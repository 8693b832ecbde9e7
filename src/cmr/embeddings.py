"""The hand-off between training and retrieval: per-split embedding files.

``<dir>/<split>.npz`` holds ``image`` [N, D] and ``text`` [T, D] (L2-normalised,
float32), ``text_item`` [T] (item row of each text), ``ids`` [N], ``texts`` [T],
``labels`` [N, C] multi-hot (C may be 0) and ``identity`` [N] (-1 when absent).

A split encoded in shards (``encode.shard_size`` > 0) is the folder ``<dir>/<split>.shards/``
instead: ``00000.npz``, ``00001.npz``, ... each a split file of its own (``text_item`` counts
from the shard's first item), and ``manifest.json`` listing them with their item and text
counts, written last. :func:`load_split` reads either form whole; :func:`iter_gallery` hands
the index stage one split file or one shard at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from cmr.data.schema import SPLITS
from cmr.errors import DataError
from cmr.io import atomic_path, read_json, read_npz, write_json


@dataclass
class SplitEmbeddings:
    image: torch.Tensor
    text: torch.Tensor
    text_item: torch.Tensor
    ids: list[str]
    texts: list[str]
    labels: torch.Tensor | None
    identity: torch.Tensor | None


def save_split(path: str | Path, e: SplitEmbeddings) -> None:
    # a file object stops np.savez from appending '.npz' to the temporary name
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f, image=e.image.numpy().astype(np.float32), text=e.text.numpy().astype(np.float32),
            text_item=e.text_item.numpy(), ids=np.asarray(e.ids, dtype=str), texts=np.asarray(e.texts, dtype=str),
            labels=(e.labels.numpy() if e.labels is not None else np.zeros((len(e.ids), 0), np.float32)),
            identity=(e.identity.numpy() if e.identity is not None else np.full(len(e.ids), -1)),
        )


def load_split(path: str | Path) -> SplitEmbeddings:
    """``<split>.npz``, or when only ``<split>.shards/`` exists its shards concatenated."""
    path = Path(path)
    if not path.exists() and shards_dir(path).is_dir():
        return concat(list(iter_shards(shards_dir(path))))
    if not path.exists():
        raise DataError(str(path), "embeddings exist", "run the encode stage first")
    z = read_npz(path, ("image", "text", "text_item", "ids", "texts", "labels", "identity"))
    labels = torch.from_numpy(z["labels"]) if z["labels"].ndim == 2 and z["labels"].shape[1] else None
    identity = torch.from_numpy(z["identity"]) if (z["identity"] >= 0).any() else None
    e = SplitEmbeddings(torch.from_numpy(z["image"]), torch.from_numpy(z["text"]),
                        torch.from_numpy(z["text_item"]).long(), z["ids"].tolist(), z["texts"].tolist(),
                        labels, identity)
    if e.image.dim() != 2 or e.text.dim() != 2 or len(e.text_item) != len(e.text):
        raise DataError(str(path), "image [N, D], text [T, D] and one text_item per text",
                        f"image {tuple(e.image.shape)}, text {tuple(e.text.shape)}, text_item {len(e.text_item)}")
    for name, emb in (("image", e.image), ("text", e.text)):
        bad = (~torch.isfinite(emb)).any(dim=1).nonzero()
        if len(bad):
            raise DataError(f"{path}: {name}[{int(bad[0])}]", "all embedding values finite", "found NaN or inf")
    if len(e.text_item) and not 0 <= int(e.text_item.min()) <= int(e.text_item.max()) < e.image.shape[0]:
        raise DataError(f"{path}: text_item", f"image rows in [0, {e.image.shape[0]})",
                        f"got {int(e.text_item.min())}..{int(e.text_item.max())}")
    if e.image.shape[1] != e.text.shape[1]:
        raise DataError(str(path), "image and text embeddings share a dimension",
                        f"image {tuple(e.image.shape)}, text {tuple(e.text.shape)}")
    return e


def concat(parts: list[SplitEmbeddings], keep_truth: bool = True) -> SplitEmbeddings:
    """``parts`` one after the other (text_item re-indexed); labels and identity too when
    ``keep_truth`` (parts of one split: their identity numbers are the split's)."""
    offsets = np.cumsum([0] + [len(p.ids) for p in parts[:-1]])

    def cat(name):
        values = [getattr(p, name) for p in parts]
        return torch.cat(values) if keep_truth and all(v is not None for v in values) else None

    return SplitEmbeddings(
        image=torch.cat([p.image for p in parts]), text=torch.cat([p.text for p in parts]),
        text_item=torch.cat([p.text_item + int(o) for p, o in zip(parts, offsets)]),
        ids=[i for p in parts for i in p.ids], texts=[t for p in parts for t in p.texts],
        labels=cat("labels"), identity=cat("identity"))


def _splits_present(embeddings_dir: str | Path) -> list[Path]:
    """The ``<split>.npz`` path of each split encoded, in SPLITS order (sharded or not)."""
    paths = [Path(embeddings_dir) / f"{s}.npz" for s in SPLITS]
    found = [p for p in paths if p.exists() or shards_dir(p).is_dir()]
    if not found:
        raise DataError(str(embeddings_dir), "embeddings exist", "run the encode stage first")
    return found


def load_gallery(embeddings_dir: str) -> SplitEmbeddings:
    """All splits concatenated in SPLITS order (text_item re-indexed)."""
    return concat([load_split(p) for p in _splits_present(embeddings_dir)], keep_truth=False)


def iter_gallery(embeddings_dir: str | Path) -> Iterator[SplitEmbeddings]:
    """The gallery of :func:`load_gallery` in pieces, in the same row order: each unsharded
    split whole, each shard of a sharded one; ``text_item`` counts from the gallery's first
    item, labels and identity are None. Memory: one piece at a time."""
    offset = 0
    for path in _splits_present(embeddings_dir):
        for part in (iter_shards(shards_dir(path)) if not path.exists() else [load_split(path)]):
            yield SplitEmbeddings(part.image, part.text, part.text_item + offset, part.ids, part.texts, None, None)
            offset += len(part.ids)


# --- sharded splits ------------------------------------------------------------------------

MANIFEST = "manifest.json"
SHARDS_FORMAT = "cmr-embedding-shards/1"


def shards_dir(split_path: str | Path) -> Path:
    """``<dir>/<split>.shards`` for the split file ``<dir>/<split>.npz``."""
    return Path(split_path).with_suffix(".shards")


def shard_name(number: int) -> str:
    return f"{number:05d}.npz"


def write_shards(directory: str | Path, shards: Iterable[SplitEmbeddings], shard_size: int) -> dict:
    """Write each shard as it comes (``00000.npz``, ...), then ``manifest.json``; returns the manifest.

    ``shards`` is consumed lazily, so only the shard being written is held here. The
    folder appears whole or not at all: a failure mid-stream (an exception from the
    producer, a kill) leaves no ``directory`` and the temporary one is removed
    (:func:`cmr.io.atomic_path`). Every shard but the last holds ``shard_size`` items.
    """
    entries, dim = [], None
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        for number, e in enumerate(shards):
            if dim is not None and e.image.shape[1] != dim:
                raise DataError(f"{directory}/{shard_name(number)}", f"embedding dimension {dim} as shard 0",
                                f"got {e.image.shape[1]}")
            dim = int(e.image.shape[1])
            save_split(tmp / shard_name(number), e)
            entries.append({"file": shard_name(number), "items": len(e.ids), "texts": int(e.text.shape[0])})
        if not entries:
            raise DataError(str(directory), "at least one shard", "the split has no items to encode")
        manifest = {"format": SHARDS_FORMAT, "shard_size": shard_size, "dim": dim, "shards": entries,
                    "items": sum(s["items"] for s in entries), "texts": sum(s["texts"] for s in entries)}
        write_json(tmp / MANIFEST, manifest)
    return manifest


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a shard folder, checked: format, one entry per shard file, counts that add up."""
    directory = Path(directory)
    m = read_json(directory / MANIFEST, dict)
    where = str(directory / MANIFEST)
    if m.get("format") != SHARDS_FORMAT:
        raise DataError(f"{where}: format", f"format {SHARDS_FORMAT!r}", f"got {m.get('format')!r}")
    shards = m.get("shards")
    if not isinstance(shards, list) or [s.get("file") for s in shards] != [shard_name(i) for i in range(len(shards))]:
        raise DataError(f"{where}: shards", "a list of shards named 00000.npz, 00001.npz, ... in order",
                        f"got {[s.get('file') for s in shards] if isinstance(shards, list) else shards!r}")
    for key in ("items", "texts"):
        if m.get(key) != sum(s.get(key, 0) for s in shards):
            raise DataError(f"{where}: {key}", f"{key} is the sum over the shards", f"got {m.get(key)!r}")
    return m


def iter_shards(directory: str | Path) -> Iterator[SplitEmbeddings]:
    """The shards of a split folder in order, each checked against the manifest."""
    directory = Path(directory)
    m = read_manifest(directory)
    for entry in m["shards"]:
        e = load_split(directory / entry["file"])
        got = {"items": len(e.ids), "texts": int(e.text.shape[0])}
        if got != {"items": entry["items"], "texts": entry["texts"]} or e.image.shape[1] != m["dim"]:
            raise DataError(str(directory / entry["file"]), f"{entry['items']} items, {entry['texts']} texts and "
                            f"dimension {m['dim']} as manifest.json says", f"got {got}, dimension {e.image.shape[1]}")
        yield e
