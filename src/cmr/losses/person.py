"""Text-based person search losses: positives are pairs of the same person (``identity``).

Several photos and captions of one person share an identity, so a batch holds many
positives per row. The target distribution of a row is uniform over its positives:
q_ij = [id_i == id_j] / #{k: id_k == id_i}.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from cmr.losses.base import (
    Loss,
    LossInputs,
    kl_prediction_to_target,
    positive_mask,
    register_loss,
    soft_targets,
)
from cmr.losses.pairwise import multi_positive_nce


class _IdentityLoss(Loss):
    requires = frozenset({"identity"})


def _kl_both_ways(inputs: LossInputs, eps: float) -> tuple[Tensor, Tensor]:
    """(image->text, text->image) KL(softmax similarities || identity distribution)."""
    logits = inputs.logits()
    positives = positive_mask(inputs, "identity")
    return (kl_prediction_to_target(logits, soft_targets(positives), eps),
            kl_prediction_to_target(logits.t(), soft_targets(positives.t()), eps))


@register_loss("nitc")
class NormalisedITC(_IdentityLoss):
    """N-ITC of TBPS-CLIP (Cao et al. 2023, "An Empirical Study of CLIP for Text-based Person
    Search"): the CLIP loss with soft targets uniform over same-identity pairs, both directions
    averaged. TBPS-CLIP also mixes in soft labels from a second, gradient-free forward pass
    (``softlabel_ratio``); LossInputs carries one pass only, so that part is not reproduced.
    """

    def forward(self, inputs: LossInputs) -> Tensor:
        return multi_positive_nce(inputs.logits(), positive_mask(inputs, "identity"))


@register_loss("ritc")
class ReverseITC(_IdentityLoss):
    """R-ITC of TBPS-CLIP (Cao et al. 2023): the reverse KL, KL(p || q_eps), of the softmax
    similarities p from the eps-smoothed identity distribution q_eps, both directions averaged.

    eps = 0.01 as in TBPS-CLIP. q + eps is renormalised here (TBPS-CLIP leaves it unnormalised):
    same gradient, and the loss is >= 0 with 0 at p = q_eps.
    """

    def __init__(self, embed_dim: int, num_classes: int, *, eps: float = 0.01):
        super().__init__(embed_dim, num_classes)
        self.check("eps", eps > 0, "must be > 0", eps)
        self.eps = float(eps)

    def forward(self, inputs: LossInputs) -> Tensor:
        i2t, t2i = _kl_both_ways(inputs, self.eps)
        return 0.5 * (i2t + t2i)


@register_loss("sdm")
class SimilarityDistributionMatching(_IdentityLoss):
    """SDM of IRRA (Jiang & Ye 2023, "Cross-Modal Implicit Relation Reasoning and Aligning for
    Text-to-Image Person Retrieval"): KL(p || q) between the softmax similarities p and the
    normalised identity-match distribution q, image->text plus text->image (summed, as IRRA).

    Same form as ``ritc``; they differ in the smoothing (eps 1e-8, only to keep log q finite)
    and in summing rather than averaging the two directions.
    """

    def __init__(self, embed_dim: int, num_classes: int, *, eps: float = 1e-8):
        super().__init__(embed_dim, num_classes)
        self.check("eps", eps > 0, "must be > 0", eps)
        self.eps = float(eps)

    def forward(self, inputs: LossInputs) -> Tensor:
        i2t, t2i = _kl_both_ways(inputs, self.eps)
        return i2t + t2i


@register_loss("id")
class IdentityClassification(_IdentityLoss):
    """ID loss (instance loss, Zheng et al. 2020; used by IRRA and TBPS-CLIP): cross-entropy
    of a linear identity classifier shared by both modalities, averaged over the two.
    ``num_classes`` is the number of training identities. Initialised as in IRRA/TBPS-CLIP
    (weights N(0, 0.001^2), bias 0).
    """

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__(embed_dim, num_classes)
        self.classifier = nn.Linear(embed_dim, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, inputs: LossInputs) -> Tensor:
        ids = inputs.identity
        return 0.5 * (F.cross_entropy(self.classifier(inputs.image), ids)
                      + F.cross_entropy(self.classifier(inputs.text), ids))
