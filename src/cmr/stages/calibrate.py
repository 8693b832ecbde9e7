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
With ``calibrate.target_bank`` (Sinkhorn, inductive bank) the bank queries' own gallery
items join the transport problem as extra columns, so a bank query's mass can go to its
true match instead of being forced onto a test gallery that does not contain it; image->text
rows then count each bank image's texts, so rows and columns both count (image, text) pairs.
The serving bias (bank against the whole gallery, which holds the bank's own items) uses
the same row weights.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from cmr.config import Params
from cmr.embeddings import SplitEmbeddings, load_gallery, load_split
from cmr.io import atomic_path, write_json
from cmr.retrieval.calibrate import (MARGINAL_NEIGHBOURS, Selection, bank_own_gallery, bank_positive_counts,
                                     calibrate, expected_texts_per_image, select_calibration)
from cmr.retrieval.evaluation import positives_t2i
from cmr.stages._common import log, stage_main

DIRECTIONS = ("t2i", "i2t")


@dataclass(frozen=True)
class Bank:
    """A query bank: the queries of ``split`` at ``rows`` (texts for t2i, images for i2t)."""
    split: SplitEmbeddings
    direction: str
    rows: torch.Tensor

    @property
    def queries(self) -> torch.Tensor:
        return _queries(self.split, self.direction)[self.rows]

    @property
    def pair_share(self) -> float:
        """Share of the split's (image, text) pairs the bank's queries take part in (below 1 when
        ``max_bank`` subsampled it): its texts' share for t2i, its images' texts' share for i2t."""
        return float(self.pair_counts().sum()) / self.split.text.shape[0]

    def pair_counts(self) -> torch.Tensor:
        """[B] each bank query's (image, text) pairs: 1 per text, an image's number of texts."""
        return bank_positive_counts(self.direction, self.rows, self.split.text_item, self.split.image.shape[0])


def draw_bank(split: SplitEmbeddings, direction: str, max_bank: int, seed: int) -> Bank:
    """All of ``split``'s queries, or ``max_bank`` of them drawn with ``seed``."""
    n = _queries(split, direction).shape[0]
    rows = (torch.arange(n) if n <= max_bank
            else torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_bank])
    return Bank(split, direction, rows)


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


def data_options(method: str, direction: str, train: SplitEmbeddings, gallery: SplitEmbeddings,
                 estimate_marginal: bool = True, bank: Bank | None = None, target_bank: bool = False) -> dict:
    """Options that follow from the data, per gallery: Sinkhorn's text->image marginal
    (``estimate_marginal=False`` keeps it uniform, the variant the calibration study compares)
    and, with ``target_bank``, the bank's own gallery as extra columns
    (:func:`cmr.retrieval.calibrate.bank_own_gallery`), both on one scale, the number of
    (image, text) pairs the bank takes part in: an own item counts its pairs with bank
    queries; a test item its expected pairs (texts per image for t2i, 1 for i2t) x the
    bank's share of its split's pairs (below 1 when ``max_bank`` subsampled the bank). With a
    target bank image->text rows are weighted by their texts (:meth:`Bank.pair_counts`), so
    rows count pairs too; without one the rows stay uniform, as in NCL (weighting them did
    not help on validation: docs/ncl.md)."""
    if method != "sinkhorn":
        return {}
    options = {}
    if estimate_marginal and direction == "t2i":
        options["gallery_weights"] = expected_texts_per_image(train.image, train.text_item, gallery.image)
    if target_bank and bank is not None:
        own, weights = bank_own_gallery(direction, bank.rows, bank.split.text_item)
        options["bank_gallery"] = bank.queries @ _gallery(bank.split, direction)[own].T
        options["bank_gallery_weights"] = weights
        per_item = options.get("gallery_weights",
                               torch.ones(_gallery(gallery, direction).shape[0], dtype=torch.float64))
        options["gallery_weights"] = per_item * bank.pair_share
        options.update(_row_weights(bank))
    return options


def _row_weights(bank: Bank) -> dict:
    """Sinkhorn's ``bank_weights`` when the bank's own items are columns: an own text is one
    (bank image, text) pair, so a bank image asks for as many columns as it has texts (an
    image without texts drops out). Text->image rows are one pair each: no option."""
    return {"bank_weights": bank.pair_counts()} if bank.direction == "i2t" else {}


def choose_on_validation(method: str, options: dict, val: SplitEmbeddings, bank_split: SplitEmbeddings | None,
                         train: SplitEmbeddings, max_bank: int, seed: int, level: str,
                         ks: Sequence[int], estimate_marginal: bool = True,
                         target_bank: bool = False) -> dict[str, Selection]:
    """Per direction, the calibration chosen on validation (``bank_split`` None: transductive)."""
    pos = positives_t2i(val.text_item, val.image.shape[0], level, val.labels, val.identity)
    chosen = {}
    for direction, positives in zip(DIRECTIONS, (pos, pos.T)):
        gallery = _gallery(val, direction)
        scores = _queries(val, direction) @ gallery.T
        bank = None if bank_split is None else draw_bank(bank_split, direction, max_bank, seed)
        chosen[direction] = select_calibration(method, scores, None if bank is None else bank.queries @ gallery.T,
                                               positives, options, tuple(ks), transductive=bank is None,
                                               fixed=data_options(method, direction, train, val,
                                                                  estimate_marginal, bank, target_bank))
    return chosen


def calibrate_test(method: str, options: dict, val: SplitEmbeddings, test: SplitEmbeddings, train: SplitEmbeddings,
                   bank_split: SplitEmbeddings, transductive: bool, max_bank: int, seed: int, level: str,
                   ks: Sequence[int], estimate_marginal: bool = True, target_bank: bool = False):
    """Choose per direction on validation, then calibrate the test split with the choice.

    Returns (chosen {direction: Selection}, calibrated {direction: [Q, G] scores}, metric suffix).
    Inductive: the selection bank is ``train``, the test bank ``bank_split``; transductive:
    each split's queries are their own bank (a target bank then has no meaning: the
    queries' own gallery is the gallery).
    """
    chosen = choose_on_validation(method, options, val, None if transductive else train, train, max_bank, seed,
                                  level, ks, estimate_marginal, target_bank)
    calibrated, suffix = {}, ""
    for d in DIRECTIONS:
        gallery = _gallery(test, d)
        scores = _queries(test, d) @ gallery.T
        bank = None if transductive else draw_bank(bank_split, d, max_bank, seed)
        calibrated[d], s = calibrate(chosen[d].method, scores, None if bank is None else bank.queries @ gallery.T,
                                     transductive=transductive, **chosen[d].options,
                                     **data_options(chosen[d].method, d, train, test, estimate_marginal,
                                                    bank, target_bank))
        suffix = suffix or s
    return chosen, calibrated, suffix


def run(embeddings_dir: str, method: str, options: dict, query_bank: str, max_bank: int, seed: int,
        level: str, ks: Sequence[int], out_dir: str, target_bank: bool = False) -> dict:
    test = load_split(f"{embeddings_dir}/test.npz")
    val = load_split(f"{embeddings_dir}/val.npz")
    transductive = query_bank == "test"
    # Selection mirrors the test-time setting on validation: an inductive bank comes
    # from training queries (validation queries would be their own bank), a
    # transductive one from the validation queries themselves.
    bank_split = load_split(f"{embeddings_dir}/{query_bank}.npz")
    train = bank_split if query_bank == "train" else load_split(f"{embeddings_dir}/train.npz")
    chosen, calibrated, suffix = calibrate_test(method, options, val, test, train, bank_split, transductive,
                                                max_bank, seed, level, ks, target_bank=target_bank)
    banks = {d: draw_bank(bank_split, d, max_bank, seed) for d in DIRECTIONS}
    meta = {"method": method, "options": options, "query_bank": query_bank, "suffix": suffix,
            "t2i_gallery_marginal": f"texts per image estimated from the {MARGINAL_NEIGHBOURS} nearest training images"
            if method == "sinkhorn" else None,
            "target_bank": bool(target_bank and method == "sinkhorn" and not transductive),
            "serving_bias_bank": "the query bank against the whole gallery, which already holds the bank's own "
                                 "items (so no separate target bank; image->text rows count each bank image's "
                                 "texts when target_bank is on)",
            "bank_sizes": {d: len(banks[d].rows) for d in DIRECTIONS},
            "selection": {"on": "val", "bank": "val (transductive)" if transductive else "train",
                          "criterion": f"sum of R@{{{','.join(map(str, ks))}}} per direction, percent"},
            "chosen": {d: {"method": c.method, "options": c.options, "val_score": c.score} for d, c in chosen.items()},
            "candidates": {d: c.candidates for d, c in chosen.items()}}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        with open(tmp / "test_scores.npz", "wb") as f:
            np.savez(f, t2i=calibrated["t2i"].float().numpy(), i2t=calibrated["i2t"].float().numpy())
        # serving biases: bank queries of the bank split against the whole gallery; when
        # validation kept 'none' in both directions there is nothing to fold into the index.
        # The whole gallery holds the bank's own items already, so no target bank is added;
        # its rows are weighted as the test calibration's were (the same transport layout).
        meta["serving_bias"] = False
        if any(c.method != "none" for c in chosen.values()):
            whole = load_gallery(embeddings_dir)

            def serving_options(d):
                rows = _row_weights(banks[d]) if meta["target_bank"] and chosen[d].method == "sinkhorn" else {}
                return {**chosen[d].options, **data_options(chosen[d].method, d, train, whole), **rows}

            bias = {d: additive_bias(chosen[d].method, banks[d].queries @ _gallery(whole, d).T, serving_options(d))
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
               p.evaluate.level, p.evaluate.ks, p.paths.calibration, c.target_bank)


def main(argv=None) -> int:
    return stage_main("calibrate", from_params, argv)


if __name__ == "__main__":
    sys.exit(main())
