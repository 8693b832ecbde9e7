"""Stage calibrate: test-time score calibration (NCL's Sinkhorn or a rival) with a query bank.

The bank is made of *training* (or validation) queries scored against the gallery;
the test queries enter the bank only when ``query_bank: test`` is asked for, and
then every metric name carries the ``@transductive`` label.

Outputs: ``test_scores.npz`` (calibrated text->image [T, N] and image->text [N, T]
scores of the test split) and, when the method turns into a per-gallery-item
additive bias (Sinkhorn, inverted softmax), ``serving_bias.npz`` over the whole
gallery so the index can serve calibrated search.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from cmr.embeddings import SplitEmbeddings, load_split
from cmr.io import atomic_path, write_json
from cmr.retrieval.calibrate import calibrate
from cmr.config import Params
from cmr.stages._common import log, stage_main


def _bank(queries: torch.Tensor, max_bank: int, seed: int) -> torch.Tensor:
    if queries.shape[0] <= max_bank:
        return queries
    keep = torch.randperm(queries.shape[0], generator=torch.Generator().manual_seed(seed))[:max_bank]
    return queries[keep]


def additive_bias(method: str, bank_scores: torch.Tensor, options: dict) -> torch.Tensor | None:
    """[G] bias b with calibrate(s) == s + b for every query row, or None if the method is not additive."""
    probe = bank_scores[: min(4, bank_scores.shape[0])]
    out, _ = calibrate(method, probe, bank_scores, **options)
    diff = out - probe
    if torch.allclose(diff, diff[:1].expand_as(diff), atol=1e-5):
        return diff[0]
    return None


def run(embeddings_dir: str, method: str, options: dict, query_bank: str, max_bank: int, seed: int,
        out_dir: str) -> dict:
    test = load_split(f"{embeddings_dir}/test.npz")
    bank_split = load_split(f"{embeddings_dir}/{query_bank}.npz")
    transductive = query_bank == "test"
    bank_text = _bank(bank_split.text, max_bank, seed)
    bank_image = _bank(bank_split.image, max_bank, seed)
    t2i = test.text @ test.image.T
    i2t = t2i.T.contiguous()
    cal_t2i, suffix = calibrate(method, t2i, bank_text @ test.image.T, transductive=transductive, **options)
    cal_i2t, _ = calibrate(method, i2t, bank_image @ test.text.T, transductive=transductive, **options)
    meta = {"method": method, "options": options, "query_bank": query_bank, "suffix": suffix,
            "bank_sizes": {"t2i": int(bank_text.shape[0]), "i2t": int(bank_image.shape[0])}}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        with open(tmp / "test_scores.npz", "wb") as f:
            np.savez(f, t2i=cal_t2i.numpy(), i2t=cal_i2t.numpy())
        gallery = _whole_gallery(embeddings_dir)
        # serving biases: bank queries of the bank split against the whole gallery
        b_img = additive_bias(method, bank_text @ gallery.image.T, options) if method != "none" else None
        b_txt = additive_bias(method, bank_image @ gallery.text.T, options) if method != "none" else None
        if b_img is not None and b_txt is not None:
            with open(tmp / "serving_bias.npz", "wb") as f:
                np.savez(f, image=b_img.numpy(), text=b_txt.numpy())
        meta["serving_bias"] = b_img is not None and b_txt is not None
        write_json(tmp / "calibration.json", meta)
    log(f"calibrate: {method} with a {query_bank} query bank -> {out_dir}")
    return meta


def _whole_gallery(embeddings_dir: str) -> SplitEmbeddings:
    from cmr.stages.index import load_gallery

    return load_gallery(embeddings_dir)


def from_params(p: Params):
    return run(p.paths.embeddings, p.calibrate.method, p.calibrate.options, p.calibrate.query_bank, p.calibrate.max_bank, p.seed, p.paths.calibration)


def main(argv=None) -> int:
    return stage_main("calibrate", from_params, argv)


if __name__ == "__main__":
    sys.exit(main())
