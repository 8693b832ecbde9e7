"""Backbone features of a prepared dataset: the cache point of the frozen-tower path.

When both towers are locked, every epoch would recompute the same backbone outputs;
computing them once and training only the heads gives identical gradients at a
fraction of the cost. The cache is content-addressed (backbone spec + data version +
item ids), so a stale entry can never be read.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from cmr.data.schema import Item
from cmr.io import atomic_path
from cmr.progress import progress


@dataclass
class FeatureSet:
    """Backbone (or head) outputs of one split.

    image: [N, F] one row per item; text: [T, F] one row per text; text_item: [T] item
    index of each text; labels: [N, C] multi-hot or None; identity: [N] or None.
    """

    image: torch.Tensor
    text: torch.Tensor
    text_item: torch.Tensor
    labels: torch.Tensor | None = None
    identity: torch.Tensor | None = None

    def subset(self, item_rows: Sequence[int]) -> "FeatureSet":
        """The items ``item_rows`` (re-indexed 0..len-1) with their texts."""
        rows = torch.as_tensor(list(item_rows), dtype=torch.long)
        remap = torch.full((self.image.shape[0],), -1, dtype=torch.long)
        remap[rows] = torch.arange(len(rows))
        keep = remap[self.text_item] >= 0
        return FeatureSet(
            image=self.image[rows],
            text=self.text[keep],
            text_item=remap[self.text_item[keep]],
            labels=None if self.labels is None else self.labels[rows],
            identity=None if self.identity is None else self.identity[rows],
        )


def label_matrix(items: Sequence[Item], label_set: Sequence[str]) -> torch.Tensor | None:
    """[N, C] multi-hot float matrix, or None when the dataset has no labels."""
    if not label_set:
        return None
    col = {lab: j for j, lab in enumerate(label_set)}
    out = torch.zeros(len(items), len(label_set))
    for i, it in enumerate(items):
        for lab in it.labels:
            out[i, col[lab]] = 1.0
    return out


def identity_vector(items: Sequence[Item]) -> torch.Tensor | None:
    if not any(it.identity is not None for it in items):
        return None
    ids = {v: k for k, v in enumerate(sorted({str(it.identity) for it in items}))}
    return torch.tensor([ids[str(it.identity)] for it in items], dtype=torch.long)


def texts_of(items: Sequence[Item]) -> tuple[list[str], torch.Tensor]:
    texts, owner = [], []
    for i, it in enumerate(items):
        texts.extend(it.texts)
        owner.extend([i] * len(it.texts))
    return texts, torch.tensor(owner, dtype=torch.long)


def load_image(root: Path, rel: str) -> Image.Image:
    with Image.open(root / rel) as im:
        return im.convert("RGB")


def decode_images(root: Path, rels: Sequence[str], preprocess: Callable) -> torch.Tensor:
    """Decode and preprocess images -> Tensor[B, 3, H, W]."""
    return torch.stack([preprocess(load_image(root, rel)) for rel in rels])


class _ImageBatches(torch.utils.data.Dataset):
    """Item ``i`` is the decoded, preprocessed batch ``batches[i]`` (a list of image paths)."""

    def __init__(self, root: Path, batches: Sequence[Sequence[str]], preprocess: Callable):
        self.root, self.batches, self.preprocess = root, batches, preprocess

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> torch.Tensor:
        return decode_images(self.root, self.batches[i], self.preprocess)


def image_batches(root: Path, batches: Sequence[Sequence[str]], preprocess: Callable, workers: int = 0,
                  seed: int = 0, pin_memory: bool = False) -> Iterable[torch.Tensor]:
    """Decoded batches in order, each Tensor[B_i, 3, H, W]; decoding runs ``workers`` batches ahead.

    ``workers=0`` decodes lazily in this process, drawing random augmentations from the
    global RNG in step order (with dropout between). With workers, each worker process
    draws from its own RNG seeded from ``seed`` and the batches go to workers round
    robin, so the augmentations are again the same run to run for the same
    (seed, workers) — but not the same as with ``workers=0``.
    """
    if workers <= 0:
        return (decode_images(root, rels, preprocess) for rels in batches)
    return torch.utils.data.DataLoader(
        _ImageBatches(root, batches, preprocess), batch_size=None, shuffle=False, num_workers=workers,
        pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed), persistent_workers=False)


@torch.no_grad()
def encode_batched(fn: Callable, batches: Iterable, total: int | None = None, desc: str = "") -> torch.Tensor:
    """Concatenated ``fn(batch)`` over the batches, as float32 on the CPU (``total`` batches:
    a progress bar on a terminal)."""
    outs = [fn(batch).float().cpu() for batch in progress(batches, total, desc, unit="batch")]
    return torch.cat(outs) if outs else torch.empty(0)


@torch.no_grad()  # features only: with an unlocked tower a graph would be kept for the whole split
def compute_backbone_features(
    model, tokenizer, preprocess, items: Sequence[Item], root: Path, features: dict | None,
    device: str, batch_size: int = 32, workers: int = 0, towers: tuple[str, ...] = ("image", "text"),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image [N, F_i], text [T, F_t], text_item [T]) backbone outputs in eval mode; a tower not in
    ``towers`` is skipped (its tensor is empty, [0]).

    Precomputed-feature datasets (``features.npz``) bypass the towers: their rows are
    the backbone features.
    """
    texts, text_item = texts_of(items)
    if features is not None and "image" in features:
        rows = [it.feature_row for it in items]
        # index first: a StoredArray (cmr.data.stored_features) then reads these rows only
        img = torch.as_tensor(np.asarray(features["image"][rows]), dtype=torch.float32)
        if "text" in features:
            txt = torch.as_tensor(np.asarray(features["text"][rows]), dtype=torch.float32)
            return img, txt, torch.arange(len(items))
        raise ValueError("a precomputed-feature dataset needs both 'image' and 'text' arrays")
    model.eval()
    to_device = lambda x: x.to(device, non_blocking=True)
    img = txt = torch.empty(0)
    if "image" in towers:
        rels = [it.image for it in items]
        rel_batches = [rels[i : i + batch_size] for i in range(0, len(rels), batch_size)]
        pixel_batches = image_batches(root, rel_batches, preprocess, workers,
                                      pin_memory=str(device).startswith("cuda"))
        img = encode_batched(
            lambda px: model.backbone_image(to_device(px).contiguous(memory_format=torch.channels_last)),
            pixel_batches, len(rel_batches), f"images ({len(rels)})")
    tb = 2 * batch_size
    if "text" in towers:
        txt = encode_batched(lambda batch: model.backbone_text(_tokens_to(tokenizer(list(batch)), device)),
                             (texts[i : i + tb] for i in range(0, len(texts), tb)), -(-len(texts) // tb),
                             f"texts ({len(texts)})")
    return img, txt, text_item


def _tokens_to(tokens, device):
    if isinstance(tokens, dict):
        return {k: v.to(device) for k, v in tokens.items()}
    return tokens.to(device)


def cache_key(spec: dict, data_version: str, item_ids: Sequence[str]) -> str:
    h = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
    h.update(data_version.encode())
    h.update("\n".join(item_ids).encode())
    return h.hexdigest()[:24]


def read_cached(cache_dir: str | Path | None, key: str) -> tuple | None:
    """The memoised ``(image, text, text_item)`` under ``cache_dir/key.pt``, or None when absent."""
    path = None if cache_dir is None else Path(cache_dir) / f"{key}.pt"
    return tuple(torch.load(path, weights_only=True)) if path is not None and path.exists() else None


def cached_backbone_features(cache_dir: str | Path | None, key: str, compute: Callable[[], tuple]) -> tuple:
    """Return ``compute()``, memoised on disk under ``cache_dir/key.pt`` when a cache dir is given."""
    if cache_dir is None:
        return compute()
    hit = read_cached(cache_dir, key)
    if hit is not None:
        return hit
    path = Path(cache_dir) / f"{key}.pt"
    out = compute()
    with atomic_path(path) as tmp:
        torch.save(list(out), tmp)
    return out
