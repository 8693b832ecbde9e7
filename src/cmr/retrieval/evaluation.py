"""Both-direction retrieval metrics over embeddings, with named ground truth.

Metric names are ``<direction>/<metric>`` (``t2i/R@1``, ``i2t/mAP``) plus ``rsum``,
the sum of R@K over both directions in percent (the usual model-selection number).
Ground truth comes from the items, at one of three levels:

* ``instance``: a text matches only its own item (an image with five captions has
  five positive texts in image->text);
* ``class``: a text matches every item that shares a label with its own item;
* ``identity``: a text matches every item of the same identity (person search).
"""
from __future__ import annotations

import re
from typing import Sequence

import torch

from cmr.retrieval.metrics import retrieval_metrics

LEVELS = ("instance", "class", "identity")


def direction_names(gallery: str = "image", query: str = "text") -> dict[str, str]:
    """Short names of the two directions for a modality pair, keyed by the internal names.

    Internally ``t2i`` always means query -> gallery and ``i2t`` gallery -> query (the
    embeddings file keeps the gallery side in ``image`` and the query side in ``text``), so
    every calibrator and metric works on any pair unchanged. For audio (query) and video
    (gallery) this gives ``{"t2i": "a2v", "i2t": "v2a"}``; image-text keeps ``t2i``/``i2t``.
    """
    g, q = gallery[0], query[0]
    return {"t2i": f"{q}2{g}", "i2t": f"{g}2{q}"}


def positives_t2i(text_item: torch.Tensor, n_items: int, level: str,
                  labels: torch.Tensor | None = None, identity: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [T, N]: is gallery item n relevant to text query t."""
    if level == "instance":
        return torch.nn.functional.one_hot(text_item, n_items).bool()
    if level == "class":
        if labels is None:
            raise ValueError("class-level evaluation needs labels; this dataset has none")
        labels = labels.float()  # multi-hot, bool or float
        return (labels[text_item] @ labels.T) > 0
    if level == "identity":
        if identity is None:
            raise ValueError("identity-level evaluation needs identities; this dataset has none")
        return identity[text_item][:, None] == identity[None, :]
    raise ValueError(f"unknown evaluation level {level!r}; one of {LEVELS}")


def score_matrices(image_emb: torch.Tensor, text_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t2i [T, N], i2t [N, T]) cosine scores of L2-normalised embeddings."""
    t2i = text_emb.float() @ image_emb.float().T
    return t2i, t2i.T.contiguous()


def both_directions(t2i: torch.Tensor, i2t: torch.Tensor, positives: torch.Tensor,
                    ks: Sequence[int] = (1, 5, 10), suffix: str = "") -> dict[str, float]:
    """Metrics for text->image (``positives`` [T, N]) and image->text (its transpose)."""
    out: dict[str, float] = {}
    for name, scores, pos in (("t2i", t2i, positives), ("i2t", i2t, positives.T)):
        # an item without any text can't be an image->text query: drop it rather than fail
        keep = pos.any(dim=1)
        for metric, value in retrieval_metrics(scores[keep], pos[keep], ks=tuple(ks)).items():
            out[f"{name}/{metric}{suffix}"] = float(value)
    out[f"rsum{suffix}"] = 100.0 * sum(out[f"{d}/R@{k}{suffix}"] for d in ("t2i", "i2t") for k in ks)
    # the class-level selection number of CLIP4CMR-style studies: mean of the two directions' mAP
    out[f"mAP{suffix}"] = 0.5 * (out[f"t2i/mAP{suffix}"] + out[f"i2t/mAP{suffix}"])
    return out


#: metrics that are fractions of queries in [0, 1] (R@K, mAP, mINP), optionally with a name suffix
_FRACTION = re.compile(r"^(R@\d+|mAP|mINP)(_.*)?$")


def in_percent(metrics: dict) -> dict:
    """``metrics`` (nested dicts allowed) with every fraction-valued metric in percent, so R@K,
    mAP and mINP share rsum's unit; ranks (MdR, MnR), rsum and counts are left as they are.

    The library computes fractions (the definitions); reports (DVC metrics, MLflow) use this.
    """
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out[k] = in_percent(v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and _FRACTION.match(k.rsplit("/", 1)[-1]):
            out[k] = 100.0 * v
        else:
            out[k] = v
    return out


def evaluate_embeddings(image_emb, text_emb, text_item, level="instance", labels=None, identity=None,
                        ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    t2i, i2t = score_matrices(image_emb, text_emb)
    pos = positives_t2i(text_item, image_emb.shape[0], level, labels, identity)
    return both_directions(t2i, i2t, pos, ks)
