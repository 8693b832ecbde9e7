"""Stage index: FAISS indexes over the whole gallery (every split), for ``cmr search``.

Two indexes: ``images/`` (text->image search) and ``texts/`` (image->text search).
When calibration produced an additive per-item bias, it is folded in as one extra
dimension (gallery ``[e, b]``, query ``[q, 1]``), so inner-product search returns the
calibrated ranking exactly.

When the encode stage wrote shards (``encode.shard_size`` > 0), the indexes are built piece
by piece (:func:`cmr.retrieval.stream_index.build_index_streamed`): one shard's embeddings in
memory at a time, besides the ids, texts and the recall queries.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from cmr.config import Params
from cmr.embeddings import iter_gallery, load_gallery
from cmr.io import atomic_path, read_npz, write_json
from cmr.retrieval.index import INDEXES, build_index
from cmr.retrieval.stream_index import build_index_streamed
from cmr.stages._common import log, stage_main


def with_bias(emb: torch.Tensor, bias: torch.Tensor | None) -> np.ndarray:
    if bias is None:
        return emb.numpy().astype(np.float32)
    return torch.cat([emb, bias[:, None].to(emb.dtype)], dim=1).numpy().astype(np.float32)


def run(embeddings_dir: str, calibration_dir: str, kind: str, options: dict, device: str, out_dir: str) -> dict:
    bias_file = Path(calibration_dir) / "serving_bias.npz"
    bias = read_npz(bias_file) if bias_file.exists() else {}
    if any(Path(embeddings_dir).glob("*.shards")):
        info = run_streamed(embeddings_dir, bias, kind, options, device, out_dir)
        log(f"index: {info} (from shards) -> {out_dir}")
        return info
    gallery = load_gallery(embeddings_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        text_ids = [f"{gallery.ids[i]}#{j}" for j, i in enumerate(gallery.text_item.tolist())]
        recall = {}
        for name, emb, ids, queries in (("images", gallery.image, gallery.ids, gallery.text),
                                        ("texts", gallery.text, text_ids, gallery.image)):
            b = torch.from_numpy(bias[name[:-1]]) if name[:-1] in bias else None
            # recall against exact search is measured with the other modality's embeddings as
            # queries (their query side of the bias trick is a constant 1)
            q = with_bias(queries, None if b is None else torch.ones(len(queries)))
            index = build_index(kind, with_bias(emb, b), ids, device=device, recall_queries=q, label=name,
                                **options)
            index.save(tmp / name)
            recall.update({f"{name}/{k}": v for k, v in index.build_stats.items() if k.startswith("recall_at")})
        write_json(tmp / "gallery.json", {"texts": gallery.texts, "text_item": gallery.text_item.tolist(),
                                          "ids": gallery.ids, "calibrated": bool(bias)})
    info = {"items": len(gallery.ids), "texts": len(gallery.texts), "kind": kind, "calibrated": bool(bias), **recall}
    log(f"index: {info} -> {out_dir}")
    return info


def _gallery_names(embeddings_dir: str) -> tuple[list[str], list[str], list[int], int]:
    """(item ids, texts, text_item, dimension) of the whole gallery, read shard by shard."""
    ids, texts, text_item, dim = [], [], [], 0
    for part in iter_gallery(embeddings_dir):
        ids += part.ids
        texts += part.texts
        text_item += part.text_item.tolist()
        dim = int(part.image.shape[1])
    return ids, texts, text_item, dim


def _blocks(embeddings_dir: str, side: str, bias) -> Iterator[np.ndarray]:
    """The gallery's ``side`` ("image" or "text") embeddings one shard at a time, with the bias
    column of those rows when ``bias`` [N or T] is given."""
    start = 0
    for part in iter_gallery(embeddings_dir):
        emb = getattr(part, side)
        yield with_bias(emb, None if bias is None else bias[start:start + len(emb)])
        start += len(emb)


def _sampled_rows(embeddings_dir: str, side: str, rows: np.ndarray) -> torch.Tensor:
    """Rows ``rows`` (sorted) of the gallery's ``side`` embeddings, gathered shard by shard."""
    out, start = [], 0
    for part in iter_gallery(embeddings_dir):
        emb = getattr(part, side)
        mine = rows[(rows >= start) & (rows < start + len(emb))]
        out.append(emb[torch.from_numpy(mine - start)])
        start += len(emb)
    return torch.cat(out)


def run_streamed(embeddings_dir: str, bias: dict, kind: str, options: dict, device: str, out_dir: str,
                 recall_sample: int = 1000, seed: int = 0) -> dict:
    """``run`` over shards: one shard's embeddings in memory at a time; the recall of an
    approximate index is measured with ``recall_sample`` queries of the other modality."""
    ids, texts, text_item, dim = _gallery_names(embeddings_dir)
    rng = np.random.default_rng(seed)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        text_ids = [f"{ids[i]}#{j}" for j, i in enumerate(text_item)]
        recall = {}
        for name, side, names, query_side, n_queries in (("images", "image", ids, "text", len(texts)),
                                                         ("texts", "text", text_ids, "image", len(ids))):
            b = torch.from_numpy(bias[side]) if side in bias else None
            q = None
            if not INDEXES.get(kind).exact:  # exact search: no recall to measure
                rows = np.sort(rng.choice(n_queries, min(recall_sample, n_queries), replace=False))
                queries = _sampled_rows(embeddings_dir, query_side, rows)
                q = with_bias(queries, None if b is None else torch.ones(len(queries)))
            index = build_index_streamed(kind, _blocks(embeddings_dir, side, b), names, dim + (b is not None),
                                         device, recall_queries=q, seed=seed, **options)
            index.save(tmp / name)
            recall.update({f"{name}/{k}": v for k, v in index.build_stats.items() if k.startswith("recall_at")})
        write_json(tmp / "gallery.json", {"texts": texts, "text_item": text_item, "ids": ids, "calibrated": bool(bias)})
    return {"items": len(ids), "texts": len(texts), "kind": kind, "calibrated": bool(bias), **recall}


def from_params(p: Params):
    return run(p.paths.embeddings, p.paths.calibration, p.index.kind, p.index.options, p.index.device, p.paths.index)


def main(argv=None) -> int:
    return stage_main("index", from_params, argv)


if __name__ == "__main__":
    sys.exit(main())
