"""Stage encode: embed every split with the selected model; the embeddings are the hand-off.

``shard_size`` 0 writes ``<split>.npz`` per split, encoded whole; N > 0 streams each split in
shards of N items into ``<split>.shards/``, for corpora whose features do not fit in memory
(:mod:`cmr.training.encoding`).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from cmr.data.prepare import load_prepared
from cmr.data.schema import SPLITS, by_split
from cmr.embeddings import SplitEmbeddings, save_split, shards_dir
from cmr.io import atomic_path
from cmr.models import load_two_tower
from cmr.config import Params
from cmr.stages._common import log, resolve_device, stage_main
from cmr.training.encoding import encode_split_sharded, encode_split_whole
from cmr.training.fit import backbone_id, model_features


def run(prepared_dir: str, model_dir: str, out_dir: str, device: str, cache_dir: str | None,
        workers: int = 0, shard_size: int = 0) -> dict:
    prepared = load_prepared(prepared_dir)
    bundle = load_two_tower(Path(model_dir) / "model", device=device)
    bid = backbone_id(Path(model_dir), "", "")
    counts = {}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for split in SPLITS:
            if not by_split(prepared.items, split):
                continue
            if shard_size:
                m = encode_split_sharded(bundle, prepared, split, bid, device, shards_dir(tmp / f"{split}.npz"),
                                         shard_size, cache_dir=cache_dir, workers=workers)
                counts[split] = {"items": m["items"], "texts": m["texts"], "shards": len(m["shards"])}
            else:
                # a tower that training left untouched keeps its pretrained cache (model_features)
                counts[split] = encode_split_whole(
                    bundle, prepared, split, bid, device, tmp / f"{split}.npz",
                    features=model_features(bundle, prepared, split, Path(model_dir), device, cache_dir, workers))
    log(f"encode: {counts} -> {out_dir}")
    return counts


def run_av(prepared_dir: str, model_dir: str, out_dir: str, gallery: str, query: str, spec, device: str,
           cache_dir: str | None, workers: int = 0) -> dict:
    """cmmixer retriever: the gallery modality's embeddings in ``image``, the query modality's in
    ``text`` (one query per item, ``text_item`` = its own row)."""
    from cmr.training.av_fit import encode_split, load_retriever, pair_items
    from cmr.training.features import identity_vector, label_matrix

    prepared = load_prepared(prepared_dir)
    model, _ = load_retriever(model_dir, device)
    counts = {}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for split in SPLITS:
            items = pair_items(prepared, split, gallery, query)
            if not items:
                continue
            emb_g, emb_q = encode_split(model, prepared, items, gallery, query, spec, device, cache_dir, workers)
            save_split(tmp / f"{split}.npz", SplitEmbeddings(
                emb_g, emb_q, torch.arange(len(items)), [it.id for it in items],
                [f"{query}:{getattr(it, query)}" for it in items], label_matrix(items, prepared.label_set),
                identity_vector(items)))
            counts[split] = {"items": len(items), "queries": len(items)}
    log(f"encode: {gallery} gallery, {query} queries {counts} -> {out_dir}")
    return counts


def from_params(p: Params):
    from cmr.stages._methods import method_for

    return method_for(p.model.arch).encode(p)


def main(argv=None) -> int:
    return stage_main("encode", from_params, argv)


if __name__ == "__main__":
    sys.exit(main())
