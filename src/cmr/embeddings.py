"""The hand-off between training and retrieval: per-split embedding files.

``<dir>/<split>.npz`` holds ``image`` [N, D] and ``text`` [T, D] (L2-normalised,
float32), ``text_item`` [T] (item row of each text), ``ids`` [N], ``texts`` [T],
``labels`` [N, C] multi-hot (C may be 0) and ``identity`` [N] (-1 when absent).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cmr.data.schema import SPLITS
from cmr.errors import DataError
from cmr.io import atomic_path, read_npz


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
    path = Path(path)
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


def load_gallery(embeddings_dir: str) -> SplitEmbeddings:
    """All splits concatenated in SPLITS order (text_item re-indexed)."""
    parts = [load_split(p) for s in SPLITS if (p := Path(embeddings_dir) / f"{s}.npz").exists()]
    if not parts:
        raise DataError(str(embeddings_dir), "embeddings exist", "run the encode stage first")
    offsets = np.cumsum([0] + [len(p.ids) for p in parts[:-1]])
    return SplitEmbeddings(
        image=torch.cat([p.image for p in parts]), text=torch.cat([p.text for p in parts]),
        text_item=torch.cat([p.text_item + int(o) for p, o in zip(parts, offsets)]),
        ids=[i for p in parts for i in p.ids], texts=[t for p in parts for t in p.texts],
        labels=None, identity=None)
