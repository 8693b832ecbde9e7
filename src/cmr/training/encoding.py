"""Encode a split of a two-tower model into the hand-off embeddings (:mod:`cmr.embeddings`).

:func:`encode_split_whole` holds every backbone feature of the split at once ([N, F_i] +
[T, F_t] floats: 5-13 KB an item for lite0-minilm, with 1-5 texts an item) and writes
``<split>.npz``. :func:`encode_split_sharded` streams it: :func:`encode_shard` takes one
shard's items through the towers and heads and :func:`cmr.embeddings.write_shards` writes
each shard before the next is encoded, so peak memory is one shard's images, features and
embeddings plus the item list itself. :func:`encode_shard` is a pure function of its items,
so a flow could run shards as tasks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch

from cmr.data.prepare import Prepared
from cmr.data.schema import Item, by_split
from cmr.embeddings import SplitEmbeddings, save_split, write_shards
from cmr.training.features import (FeatureSet, cache_key, cached_backbone_features, compute_backbone_features,
                                   identity_vector, label_matrix)
from cmr.training.fit import split_features


def shard_bounds(count: int, shard_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each shard of ``count`` items: every shard ``shard_size`` long but the last."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [(i, min(i + shard_size, count)) for i in range(0, count, shard_size)]


@torch.no_grad()
def encode_shard(bundle, items: Sequence[Item], root: Path, features: dict | None, label_set: Sequence[str],
                 identity: torch.Tensor | None, device: str, *, workers: int = 0, cache_dir: str | None = None,
                 cache_spec: dict | None = None) -> SplitEmbeddings:
    """Head embeddings of ``items`` (one shard): image [n, D], text [t, D] float32 on the CPU,
    ``text_item`` [t] counting from this shard's first item.

    ``identity`` [n]: the shard's slice of the split's identity numbers (numbered over the
    whole split, so shards agree), or None. ``cache_spec`` (with ``cache_dir``) memoises the
    shard's backbone features under a key of the spec and the shard's item ids.
    """
    model = bundle.model.eval()
    compute = lambda: compute_backbone_features(model, bundle.tokenizer, bundle.preprocess_val, items, root,
                                                features, device, workers=workers)
    key = cache_key(cache_spec or {}, "shard", [it.id for it in items])
    img, txt, text_item = cached_backbone_features(cache_dir if cache_spec else None, key, compute)
    return _with_heads(model, img, txt, text_item, items, label_matrix(items, label_set), identity, device)


def _with_heads(model, img, txt, text_item, items, labels, identity, device) -> SplitEmbeddings:
    """Backbone features -> the heads' embeddings (float32, CPU) with the items' names."""
    image = model.head_image(img.to(device)).float().cpu()
    text = model.head_text(txt.to(device)).float().cpu()
    texts = [t for it in items for t in it.texts] or [f"<features:{it.id}>" for it in items]
    return SplitEmbeddings(image, text, text_item, [it.id for it in items], texts, labels, identity)


@torch.no_grad()
def encode_split_whole(bundle, prepared: Prepared, split: str, bid: str, device: str, out_path: str | Path, *,
                       cache_dir: str | None = None, workers: int = 0, features: FeatureSet | None = None) -> dict:
    """Encode split ``split`` in one piece into ``out_path`` (``<split>.npz``); backbone features
    memoised as :func:`cmr.training.fit.split_features` does, or ``features`` when given (the
    split's backbone features, e.g. :func:`cmr.training.fit.model_features`). Returns item and text counts."""
    items = by_split(prepared.items, split)
    fs = features if features is not None else split_features(bundle, prepared, split, bid, device, cache_dir, workers)
    e = _with_heads(bundle.model.eval(), fs.image, fs.text, fs.text_item, items, fs.labels, fs.identity, device)
    save_split(out_path, e)
    return {"items": len(items), "texts": int(e.text.shape[0])}


def encode_split_sharded(bundle, prepared: Prepared, split: str, bid: str, device: str, out_dir: str | Path,
                         shard_size: int, *, cache_dir: str | None = None, workers: int = 0) -> dict:
    """Encode split ``split`` shard by shard (``shard_size`` items, in order) into the shard
    folder ``out_dir`` (:func:`cmr.embeddings.write_shards`); returns its manifest. Each
    shard's backbone features are memoised on their own under ``cache_dir``."""
    items = by_split(prepared.items, split)
    identity = identity_vector(items)  # [N] ints: numbered over the split, sliced per shard
    spec = {"backbone": bid, "data_version": prepared.info["data_version"]}

    def shards() -> Iterator[SplitEmbeddings]:
        for start, stop in shard_bounds(len(items), shard_size):
            yield encode_shard(bundle, items[start:stop], prepared.root, prepared.features, prepared.label_set,
                               None if identity is None else identity[start:stop], device, workers=workers,
                               cache_dir=cache_dir, cache_spec=spec)

    return write_shards(out_dir, shards(), shard_size)
