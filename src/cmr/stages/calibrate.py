"""Stage calibrate: test-time score calibration (NCL's Sinkhorn or a rival) with a query bank.

The bank is made of *training* (or validation) queries scored against the gallery;
the test queries enter the bank only when ``query_bank: test`` is asked for, and
then every metric name carries the ``@transductive`` label.

The calibrator's options are chosen on VALIDATION, per direction: validation queries
against the validation gallery, with a training bank (with the validation queries as
their own bank in the transductive setting). ``calibrate.options`` gives the grid (a
list is a set of alternatives; options left out take ``DEFAULT_GRIDS``), and ``none``
is always a candidate, so calibration never scores below the raw similarities on
validation. The test split is only calibrated with what was chosen.

Outputs: ``test_scores.npz`` (calibrated text->image [T, N] and image->text [N, T]
scores of the test split), ``calibration.json`` (the choice per direction and every
candidate's validation score) and, when both chosen calibrations are a per-gallery-item
additive bias (Sinkhorn, inverted softmax, none), ``serving_bias.npz`` over the whole
gallery so the index can serve calibrated search.

Sinkhorn's text->image gallery marginal is not uniform when images have several texts:
each gallery image gets the number of texts it is expected to be asked by, estimated
from its nearest training images (:func:`expected_texts_per_image`), never from the
test queries. Image->text keeps the uniform marginal (each text has one image).
"""
from __future__ import annotations

import sys
from typing import Sequence

import numpy as np
import torch

from cmr.config import Params
from cmr.embeddings import SplitEmbeddings, load_gallery, load_split
from cmr.io import atomic_path, write_json
from cmr.retrieval.calibrate import (MARGINAL_NEIGHBOURS, Selection, calibrate, expected_texts_per_image,
                                     select_calibration)
from cmr.retrieval.evaluation import positives_t2i
from cmr.stages._common import log, stage_main

DIRECTIONS = ("t2i", "i2t")


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


def _queries(split: SplitEmbeddings, direction: str) -> torch.Tensor:
    return split.text if direction == "t2i" else split.image


def _gallery(split: SplitEmbeddings, direction: str) -> torch.Tensor:
    return split.image if direction == "t2i" else split.text


def data_options(method: str, direction: str, train: SplitEmbeddings, gallery_images: torch.Tensor,
                 estimate_marginal: bool = True) -> dict:
    """Options that follow from the data, per gallery: Sinkhorn's text->image marginal
    (``estimate_marginal=False`` keeps it uniform, the variant the calibration study compares)."""
    if estimate_marginal and method == "sinkhorn" and direction == "t2i":
        return {"gallery_weights": expected_texts_per_image(train.image, train.text_item, gallery_images)}
    return {}


def choose_on_validation(method: str, options: dict, val: SplitEmbeddings, bank_split: SplitEmbeddings | None,
                         train: SplitEmbeddings, max_bank: int, seed: int, level: str,
                         ks: Sequence[int], estimate_marginal: bool = True) -> dict[str, Selection]:
    """Per direction, the calibration chosen on validation (``bank_split`` None: transductive)."""
    pos = positives_t2i(val.text_item, val.image.shape[0], level, val.labels, val.identity)
    chosen = {}
    for direction, positives in zip(DIRECTIONS, (pos, pos.T)):
        gallery = _gallery(val, direction)
        scores = _queries(val, direction) @ gallery.T
        bank = None if bank_split is None else _bank(_queries(bank_split, direction), max_bank, seed) @ gallery.T
        chosen[direction] = select_calibration(method, scores, bank, positives, options, tuple(ks),
                                               transductive=bank_split is None,
                                               fixed=data_options(method, direction, train, val.image,
                                                                  estimate_marginal))
    return chosen


def calibrate_test(method: str, options: dict, val: SplitEmbeddings, test: SplitEmbeddings, train: SplitEmbeddings,
                   bank_split: SplitEmbeddings, transductive: bool, max_bank: int, seed: int, level: str,
                   ks: Sequence[int], estimate_marginal: bool = True):
    """Choose per direction on validation, then calibrate the test split with the choice.

    Returns (chosen {direction: Selection}, calibrated {direction: [Q, G] scores}, metric suffix).
    Inductive: the selection bank is ``train``, the test bank ``bank_split``; transductive:
    each split's queries are their own bank.
    """
    chosen = choose_on_validation(method, options, val, None if transductive else train, train, max_bank, seed,
                                  level, ks, estimate_marginal)
    calibrated, suffix = {}, ""
    for d in DIRECTIONS:
        gallery = _gallery(test, d)
        scores = _queries(test, d) @ gallery.T
        bank = None if transductive else _bank(_queries(bank_split, d), max_bank, seed) @ gallery.T
        calibrated[d], s = calibrate(chosen[d].method, scores, bank, transductive=transductive, **chosen[d].options,
                                     **data_options(chosen[d].method, d, train, test.image, estimate_marginal))
        suffix = suffix or s
    return chosen, calibrated, suffix


def run(embeddings_dir: str, method: str, options: dict, query_bank: str, max_bank: int, seed: int,
        level: str, ks: Sequence[int], out_dir: str) -> dict:
    test = load_split(f"{embeddings_dir}/test.npz")
    val = load_split(f"{embeddings_dir}/val.npz")
    transductive = query_bank == "test"
    # Selection mirrors the test-time setting on validation: an inductive bank comes
    # from training queries (validation queries would be their own bank), a
    # transductive one from the validation queries themselves.
    bank_split = load_split(f"{embeddings_dir}/{query_bank}.npz")
    train = bank_split if query_bank == "train" else load_split(f"{embeddings_dir}/train.npz")
    chosen, calibrated, suffix = calibrate_test(method, options, val, test, train, bank_split, transductive,
                                                max_bank, seed, level, ks)
    banks = {d: _bank(_queries(bank_split, d), max_bank, seed) for d in DIRECTIONS}
    meta = {"method": method, "options": options, "query_bank": query_bank, "suffix": suffix,
            "t2i_gallery_marginal": f"texts per image estimated from the {MARGINAL_NEIGHBOURS} nearest training images"
            if method == "sinkhorn" else None,
            "bank_sizes": {d: int(banks[d].shape[0]) for d in DIRECTIONS},
            "selection": {"on": "val", "bank": "val (transductive)" if transductive else "train",
                          "criterion": f"sum of R@{{{','.join(map(str, ks))}}} per direction, percent"},
            "chosen": {d: {"method": c.method, "options": c.options, "val_score": c.score} for d, c in chosen.items()},
            "candidates": {d: c.candidates for d, c in chosen.items()}}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        with open(tmp / "test_scores.npz", "wb") as f:
            np.savez(f, t2i=calibrated["t2i"].float().numpy(), i2t=calibrated["i2t"].float().numpy())
        # serving biases: bank queries of the bank split against the whole gallery; when
        # validation kept 'none' in both directions there is nothing to fold into the index
        meta["serving_bias"] = False
        if any(c.method != "none" for c in chosen.values()):
            whole = load_gallery(embeddings_dir)
            bias = {d: additive_bias(chosen[d].method, banks[d] @ _gallery(whole, d).T,
                                     {**chosen[d].options, **data_options(chosen[d].method, d, train, whole.image)})
                    for d in DIRECTIONS}
            meta["serving_bias"] = all(b is not None for b in bias.values())
            if meta["serving_bias"]:
                with open(tmp / "serving_bias.npz", "wb") as f:
                    np.savez(f, image=bias["t2i"].float().numpy(), text=bias["i2t"].float().numpy())
        write_json(tmp / "calibration.json", meta)
    picked = ", ".join(f"{d}: {c.method} {c.options}" for d, c in chosen.items())
    log(f"calibrate: {method} with a {query_bank} query bank; chosen on val: {picked} -> {out_dir}")
    return meta


def from_params(p: Params):
    c = p.calibrate
    return run(p.paths.embeddings, c.method, c.options, c.query_bank, c.max_bank, p.seed,
               p.evaluate.level, p.evaluate.ks, p.paths.calibration)


def main(argv=None) -> int:
    return stage_main("calibrate", from_params, argv)


if __name__ == "__main__":
    sys.exit(main())
