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

from cmr.data.schema import SPLITS
from cmr.embeddings import SplitEmbeddings, load_split
from cmr.io import atomic_path, write_json
from cmr.retrieval.index import build_index
from cmr.config import Params
from cmr.stages._common import log, stage_main


def load_gallery(embeddings_dir: str) -> SplitEmbeddings:
    """All splits concatenated in SPLITS order (text_item re-indexed)."""
    parts = [load_split(p) for s in SPLITS if (p := Path(embeddings_dir) / f"{s}.npz").exists()]
    offsets = np.cumsum([0] + [len(p.ids) for p in parts[:-1]])
    return SplitEmbeddings(
        image=torch.cat([p.image for p in parts]), text=torch.cat([p.text for p in parts]),
        text_item=torch.cat([p.text_item + int(o) for p, o in zip(parts, offsets)]),
        ids=[i for p in parts for i in p.ids], texts=[t for p in parts for t in p.texts],
        labels=None, identity=None)


def with_bias(emb: torch.Tensor, bias: torch.Tensor | None) -> np.ndarray:
    if bias is None:
        return emb.numpy().astype(np.float32)
    return torch.cat([emb, bias[:, None].to(emb.dtype)], dim=1).numpy().astype(np.float32)


def run(embeddings_dir: str, calibration_dir: str, kind: str, options: dict, device: str, out_dir: str) -> dict:
    gallery = load_gallery(embeddings_dir)
    bias_file = Path(calibration_dir) / "serving_bias.npz"
    bias = dict(np.load(bias_file)) if bias_file.exists() else {}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        text_ids = [f"{gallery.ids[i]}#{j}" for j, i in enumerate(gallery.text_item.tolist())]
        for name, emb, ids in (("images", gallery.image, gallery.ids), ("texts", gallery.text, text_ids)):
            b = torch.from_numpy(bias[name[:-1]]) if name[:-1] in bias else None
            build_index(kind, with_bias(emb, b), ids, device=device, **options).save(tmp / name)
        write_json(tmp / "gallery.json", {"texts": gallery.texts, "text_item": gallery.text_item.tolist(),
                                          "ids": gallery.ids, "calibrated": bool(bias)})
    info = {"items": len(gallery.ids), "texts": len(gallery.texts), "kind": kind, "calibrated": bool(bias)}
    log(f"index: {info} -> {out_dir}")
    return info


def from_params(p: Params):
    return run(p.paths.embeddings, p.paths.calibration, p.index.kind, p.index.options, p.index.device, p.paths.index)


def main(argv=None) -> int:
    return stage_main("index", from_params, argv)


if __name__ == "__main__":
    sys.exit(main())
