"""Class-wise losses: they tie embeddings to class labels (``labels``: [B, C] multi-hot).

Classifiers, proxies and centres are shared by both modalities, so images and texts
of one class meet in one place (CLIP4CMR, Zeng & Mao 2022). Both modalities are stacked
into 2B rows and weighted alike. Multi-label rows spread their target uniformly over
their labels; rows with no label are left out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmr.losses.base import (
    Loss,
    LossInputs,
    both_modalities,
    positive_mask,
    register_loss,
    soft_cross_entropy,
    soft_targets,
)
from cmr.losses.pairwise import multi_positive_nce


class _LabelLoss(Loss):
    requires = frozenset({"labels"})

    @staticmethod
    def stacked(inputs: LossInputs) -> tuple[Tensor, Tensor]:
        """[2B, D] embeddings (images then texts) and their [2B, C] labels."""
        return both_modalities(inputs), torch.cat([inputs.labels, inputs.labels], dim=0)


def sq_distances(x: Tensor, centres: Tensor) -> Tensor:
    """[N, D], [C, D] -> [N, C] squared Euclidean distances."""
    return (x.pow(2).sum(1)[:, None] + centres.pow(2).sum(1)[None, :] - 2 * x @ centres.t()).clamp_min(0)


@register_loss("ce")
class CrossEntropy(_LabelLoss):
    """Cross-entropy over a linear classifier shared by both modalities, as compared in CLIP4CMR
    (Zeng & Mao 2022).

    ``target="softmax"`` (default): softmax cross-entropy against the labels spread uniformly
    (exactly the usual CE for single-label data). ``target="bce"``: one binary cross-entropy
    per class (multi-label classification; unlabelled rows count as negatives of every class).
    """

    def __init__(self, embed_dim: int, num_classes: int, *, target: str = "softmax"):
        super().__init__(embed_dim, num_classes)
        self.check("target", target in ("softmax", "bce"), "must be 'softmax' or 'bce'", target)
        self.target = target
        self.classifier = nn.Linear(embed_dim, num_classes)

    def forward(self, inputs: LossInputs) -> Tensor:
        x, y = self.stacked(inputs)
        logits = self.classifier(x)
        if self.target == "bce":
            return F.binary_cross_entropy_with_logits(logits, y)
        return soft_cross_entropy(logits, y / y.sum(1, keepdim=True).clamp_min(1))


@register_loss("label_regression")
class LabelRegression(_LabelLoss):
    """Label regression: a shared linear map predicts the multi-hot label vector, penalised by
    mean squared error over rows and classes (the label-space loss of DSCMR, Zhen et al. 2019,
    as compared in CLIP4CMR, which uses the per-row L2 norm; MSE is used here)."""

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__(embed_dim, num_classes)
        self.regressor = nn.Linear(embed_dim, num_classes)

    def forward(self, inputs: LossInputs) -> Tensor:
        x, y = self.stacked(inputs)
        return F.mse_loss(self.regressor(x), y)


@register_loss("prototype")
class PrototypeContrastive(_LabelLoss):
    """Prototype contrastive loss with FIXED class prototypes, as CLIP4CMR (Zeng & Mao 2022,
    after PAN, Zeng et al. 2021): CE over -||x - p_c||^2 for unit prototypes p_c.

    For unit vectors -||x - p||^2 = 2 cos - 2, so this is CE over ``scale * cos`` with
    scale 2 (the default, as in CLIP4CMR); ``scale=None`` uses the model's ``logit_scale``.
    Prototypes are a buffer (saved, never trained): ``init="random"`` draws normalised
    Gaussians (CLIP4CMR), ``init="orthogonal"`` an orthonormal set (needs C <= D); ``seed``
    makes them independent of the global RNG.
    """

    def __init__(self, embed_dim: int, num_classes: int, *, scale: float | None = 2.0, init: str = "random",
                 seed: int = 0):
        super().__init__(embed_dim, num_classes)
        self.check("scale", scale is None or scale > 0, "must be > 0 or null", scale)
        self.check("init", init in ("random", "orthogonal"), "must be 'random' or 'orthogonal'", init)
        if init == "orthogonal":
            self.check("init", num_classes <= embed_dim,
                       f"'orthogonal' needs num_classes <= embed_dim ({num_classes} > {embed_dim})", init)
        self.scale = scale
        gen = torch.Generator().manual_seed(int(seed))
        draw = torch.randn(embed_dim, max(num_classes, 1), generator=gen)
        protos = torch.linalg.qr(draw).Q.t() if init == "orthogonal" else F.normalize(draw.t(), dim=1)
        self.register_buffer("prototypes", protos[:num_classes].contiguous())

    def forward(self, inputs: LossInputs) -> Tensor:
        x, y = self.stacked(inputs)
        scale = inputs.logit_scale if self.scale is None else self.scale
        return soft_cross_entropy(scale * x @ self.prototypes.t(), y / y.sum(1, keepdim=True).clamp_min(1))


@register_loss("proxy_nca")
class ProxyNCA(_LabelLoss):
    """Proxy-NCA (Movshovitz-Attias et al. 2017, "No Fuss Distance Metric Learning using
    Proxies"): one learnable proxy per class, CE over -scale * ||x - p_c||^2 with unit x, p.

    Choice: the positive proxy stays in the denominator and a scale is applied, as in
    ProxyNCA++ (Teh et al. 2020; scale 9 = 1/0.11 is its temperature) and the Proxy-NCA
    baseline of Kim et al. 2020. The original leaves the positive out, which makes the loss
    unbounded below.
    """

    def __init__(self, embed_dim: int, num_classes: int, *, scale: float = 9.0):
        super().__init__(embed_dim, num_classes)
        self.check("scale", scale > 0, "must be > 0", scale)
        self.scale = float(scale)
        self.proxies = nn.Parameter(torch.randn(num_classes, embed_dim))

    def forward(self, inputs: LossInputs) -> Tensor:
        x, y = self.stacked(inputs)
        dist = sq_distances(F.normalize(x, dim=1), F.normalize(self.proxies, dim=1))
        return soft_cross_entropy(-self.scale * dist, y / y.sum(1, keepdim=True).clamp_min(1))


@register_loss("proxy_anchor")
class ProxyAnchor(_LabelLoss):
    """Proxy-Anchor loss (Kim et al. 2020, "Proxy Anchor Loss for Deep Metric Learning"):

    L = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x,p) - delta)))
      + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x,p) + delta)))

    with cosine s, learnable proxies P (one per class), P+ the proxies with a positive in
    the batch, and X the 2B stacked image and text embeddings. Multi-label natively.
    """

    def __init__(self, embed_dim: int, num_classes: int, *, alpha: float = 32.0, delta: float = 0.1):
        super().__init__(embed_dim, num_classes)
        self.check("alpha", alpha > 0, "must be > 0", alpha)
        self.check("delta", delta >= 0, "must be >= 0", delta)
        self.alpha, self.delta = float(alpha), float(delta)
        self.proxies = nn.Parameter(torch.randn(num_classes, embed_dim))

    def forward(self, inputs: LossInputs) -> Tensor:
        x, y = self.stacked(inputs)
        cos = F.normalize(x, dim=1) @ F.normalize(self.proxies, dim=1).t()  # [2B, C]
        pos = y > 0
        # log(1 + sum exp(z)) = logsumexp over [0, z...]; masked terms get -inf
        pos_z = torch.where(pos, -self.alpha * (cos - self.delta), float("-inf"))
        neg_z = torch.where(pos, float("-inf"), self.alpha * (cos + self.delta))
        zero = cos.new_zeros(1, cos.shape[1])
        pos_term = torch.logsumexp(torch.cat([zero, pos_z], 0), dim=0)  # [C], 0 for proxies without positives
        neg_term = torch.logsumexp(torch.cat([zero, neg_z], 0), dim=0)
        with_pos = pos.any(0).sum().clamp_min(1)
        return pos_term.sum() / with_pos + neg_term.sum() / cos.shape[1]


@register_loss("supcon")
class SupCon(_LabelLoss):
    """Supervised contrastive loss across modalities (Khosla et al. 2020, "Supervised
    Contrastive Learning", L_out form): image anchors against text candidates and back,
    positives = the same item or a shared label, scaled by ``logit_scale``.

    L = 1/2 [CE(s I T^T, Y) + CE(s T I^T, Y^T)], Y_ij uniform over i's positives.
    """

    def forward(self, inputs: LossInputs) -> Tensor:
        return multi_positive_nce(inputs.logits(), positive_mask(inputs, "labels"))


@register_loss("center")
class Center(_LabelLoss):
    """Center loss (Wen et al. 2016, "A Discriminative Feature Learning Approach for Deep Face
    Recognition"): 1/2 ||x - c_y||^2 to a learnable centre per class, shared by both
    modalities, averaged over a row's labels and over labelled rows.

    The centres are trained by the optimiser (not Wen et al.'s separate update rule).
    Alone it collapses everything to one point; use it beside a discriminative loss.
    """

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__(embed_dim, num_classes)
        self.centers = nn.Parameter(F.normalize(torch.randn(num_classes, embed_dim), dim=1))

    def forward(self, inputs: LossInputs) -> Tensor:
        x, y = self.stacked(inputs)
        per_row = 0.5 * (soft_targets(y > 0) * sq_distances(x, self.centers)).sum(1)
        return per_row.sum() / (y.sum(1) > 0).sum().clamp_min(1)
