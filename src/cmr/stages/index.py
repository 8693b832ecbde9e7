"""Stage index: FAISS indexes over the whole gallery (every split), for ``cmr search``.

Two indexes: ``images/`` (text->image search) and ``texts/`` (image->text search).
When calibration produced an additive per-item bias, it is folded in as one extra
dimension (gallery ``[e, b]``, query ``[q, 1]``), so inner-product search returns the
calibrated ranking exactly.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from cmr.config import Params
from cmr.embeddings import load_gallery
from cmr.io import atomic_path, read_npz, write_json
from cmr.retrieval.index import build_index
from cmr.stages._common import log, stage_main


def with_bias(emb: torch.Tensor, bias: torch.Tensor | None) -> np.ndarray:
    if bias is None:
        return emb.numpy().astype(np.float32)
    return torch.cat([emb, bias[:, None].to(emb.dtype)], dim=1).numpy().astype(np.float32)


def run(embeddings_dir: str, calibration_dir: str, kind: str, options: dict, device: str, out_dir: str) -> dict:
    gallery = load_gallery(embeddings_dir)
    bias_file = Path(calibration_dir) / "serving_bias.npz"
    bias = read_npz(bias_file) if bias_file.exists() else {}
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


def from_params(p: Params):
    return run(p.paths.embeddings, p.paths.calibration, p.index.kind, p.index.options, p.index.device, p.paths.index)


def main(argv=None) -> int:
    return stage_main("index", from_params, argv)


if __name__ == "__main__":
    sys.exit(main())
