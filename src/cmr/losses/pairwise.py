"""Pair-wise losses: they compare image-text pairs within the batch.

Positives are pairs of the same item by default; ``triplet`` and ``contrastive``
can widen them to a shared label or identity (``positives="labels"``), which is how
CLIP4CMR (Zeng & Mao 2022) runs pair-wise losses on class-labelled data.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cmr.losses.base import (
    Loss,
    LossInputs,
    positive_mask,
    register_loss,
    same_key,
    soft_cross_entropy,
    soft_targets,
)

POSITIVES = ("item", "labels", "identity")


def multi_positive_nce(logits: Tensor, positives: Tensor) -> Tensor:
    """Symmetric InfoNCE with several positives per row.

    logits: [B, B] scaled similarities (image rows, text columns); positives: [B, B] bool.
    Each direction is a cross-entropy against the uniform distribution over the
    row's positives; the two directions are averaged.
    """
    targets = soft_targets(positives)
    return 0.5 * (soft_cross_entropy(logits, targets) + soft_cross_entropy(logits.t(), soft_targets(positives.t())))


class _PairLoss(Loss):
    """Shared option: which pairs count as positives."""

    def __init__(self, embed_dim: int, num_classes: int, positives: str):
        super().__init__(embed_dim, num_classes)
        self.check("positives", positives in POSITIVES, f"must be one of {POSITIVES}", positives)
        self.positives = positives
        self.requires = frozenset() if positives == "item" else frozenset({positives})


@register_loss("infonce")
class InfoNCE(Loss):
    """Symmetric CLIP contrastive loss (Radford et al. 2021, "Learning Transferable Visual
    Models From Natural Language Supervision"), with every equal-``item`` pair as a positive.

    L = 1/2 [CE(s * I T^T, Y) + CE(s * T I^T, Y^T)], Y_ij = [item_i == item_j] / #positives_i.
    Without duplicates in the batch this is exactly CLIP's loss.
    """

    def forward(self, inputs: LossInputs) -> Tensor:
        return multi_positive_nce(inputs.logits(), same_key(inputs.item))


@register_loss("triplet")
class Triplet(_PairLoss):
    """Bidirectional hinge triplet loss with the hardest negative, VSE++ (Faghri et al. 2018,
    "VSE++: Improving Visual-Semantic Embeddings with Hard Negatives").

    For every positive pair (i, j) with cosine s_ij:
    [margin - s_ij + max_{k neg} s_ik]_+ + [margin - s_ij + max_{k neg} s_kj]_+,
    averaged over positive pairs (VSE++ sums over the batch; the mean keeps the scale
    independent of the batch size). ``hardest=False`` sums over all negatives instead
    (VSE0). Cosines, not ``logit_scale``: the margin is in cosine units.
    """

    def __init__(self, embed_dim: int, num_classes: int, *, margin: float = 0.2, hardest: bool = True,
                 positives: str = "item"):
        super().__init__(embed_dim, num_classes, positives)
        self.check("margin", margin >= 0, "must be >= 0", margin)
        self.margin, self.hardest = float(margin), bool(hardest)

    def forward(self, inputs: LossInputs) -> Tensor:
        sims = inputs.image @ inputs.text.t()
        pos = positive_mask(inputs, self.positives)
        if self.hardest:
            negatives = sims.masked_fill(pos, float("-inf"))
            # a row with no negative gets -inf here, and its hinge is 0
            hardest_text = negatives.max(dim=1, keepdim=True).values
            hardest_image = negatives.max(dim=0, keepdim=True).values
            cost = (self.margin - sims + hardest_text).clamp_min(0) + (self.margin - sims + hardest_image).clamp_min(0)
        else:
            neg = (~pos).float()
            # cost[i, j] = sum_k neg_ik [m - s_ij + s_ik]_+  +  sum_k neg_kj [m - s_ij + s_kj]_+
            by_text = ((self.margin - sims[:, :, None] + sims[:, None, :]).clamp_min(0) * neg[:, None, :]).sum(2)
            by_image = ((self.margin - sims[:, :, None] + sims.t()[None, :, :]).clamp_min(0) * neg.t()[None]).sum(2)
            cost = by_text + by_image
        pos = pos.float()
        return (cost * pos).sum() / pos.sum()


@register_loss("contrastive")
class Contrastive(_PairLoss):
    """Pair-wise margin contrastive loss (Hadsell, Chopra & LeCun 2006), in the form CLIP4CMR
    compares (Zeng & Mao 2022, "A Comprehensive Empirical Study of Vision-Language Pre-trained
    Model for Supervised Cross-Modal Retrieval"): with d_ij = ||image_i - text_j||^2,

    L = 1/B [sum_{pos} d_ij + sum_{neg} [margin - d_ij]_+]   over all B x B cross-modal pairs.

    Squared distances and a margin on them, as CLIP4CMR; for unit vectors d = 2 - 2 cos,
    so the default margin 0.2 pushes negatives below cosine 0.9.
    """

    def __init__(self, embed_dim: int, num_classes: int, *, margin: float = 0.2, positives: str = "item"):
        super().__init__(embed_dim, num_classes, positives)
        self.check("margin", margin >= 0, "must be >= 0", margin)
        self.margin = float(margin)

    def forward(self, inputs: LossInputs) -> Tensor:
        image, text = inputs.image, inputs.text
        dist = (image.pow(2).sum(1)[:, None] + text.pow(2).sum(1)[None, :] - 2 * image @ text.t()).clamp_min(0)
        pos = positive_mask(inputs, self.positives)
        cost = torch.where(pos, dist, (self.margin - dist).clamp_min(0))
        return cost.sum() / image.shape[0]
