"""CLIP4CMR mode on precomputed features: per-modality heads into a shared, L2-normalised space.

:class:`FeatureHeads` has the head API that :func:`cmr.training.engine.train_heads`
uses (``head_image``, ``head_text``, ``logit_scale``, ``embed_dim``), so any
registered loss trains it on a :class:`~cmr.training.features.FeatureSet` of
precomputed features (e.g. Wikipedia's 128-d SIFT / 10-d LDA) or of frozen
backbone outputs.

:class:`WithUnpaired` wraps a combined loss so that items of one modality whose
partner is missing (the modality-imbalance study) still enter the row-wise
class-wise terms.

:func:`hellinger` and :func:`knn_label_votes` are input feature maps for histogram
features (the Wikipedia study's image side): the square root turns the cosine of two
L1-normalised histograms into their Bhattacharyya coefficient, and the votes of a
sample's nearest training images are a non-parametric class posterior that the head
gets beside the histogram.

:class:`PosteriorHeads` turns heads trained with a class-wise loss into class-posterior
embeddings, so that a score is the probability that two items share a class
(:func:`class_logits` finds the loss's classifier or class anchors).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmr.errors import ConfigError, DataError
from cmr.losses import CombinedLoss, LossInputs
from cmr.losses.classwise import sq_distances
from cmr.models.heads import build_head
from cmr.training.features import FeatureSet

#: losses whose value is a mean over independent rows of the stacked image+text batch: they
#: need no partner, so an item seen in one modality only can still feed them
ROW_WISE = frozenset({"ce", "label_regression", "prototype", "proxy_nca", "proxy_anchor", "center"})


class Standardise(nn.Module):
    """x -> (x - mean) / std with train-split statistics held as buffers (saved with the model).

    SIFT histograms are L1-normalised (entries ~1e-2) and LDA topic proportions are
    skewed: without this the first layer sees inputs on very different scales.
    """

    def __init__(self, mean: Tensor, std: Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float().clone())
        # a constant column (std 0) would divide by zero; leave it centred instead
        self.register_buffer("std", torch.where(std > 1e-8, std, torch.ones_like(std)).float().clone())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class FeatureHeads(nn.Module):
    """Two heads from per-modality input features to a joint D-dim space.

    head_image: [B, F_i] -> [B, D] unit rows; head_text: [B, F_t] -> [B, D] unit rows.
    ``logit_scale`` is log(1 / temperature); ``learn_scale=False`` freezes it so a
    temperature can be swept as a hyper-parameter.
    """

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int, head: str = "mlp", *,
                 temperature: float = 0.07, learn_scale: bool = True,
                 image_stats: tuple[Tensor, Tensor] | None = None, text_stats: tuple[Tensor, Tensor] | None = None):
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.norm_image = Standardise(*image_stats) if image_stats else nn.Identity()
        self.norm_text = Standardise(*text_stats) if text_stats else nn.Identity()
        self.proj_image = build_head(head, image_dim, embed_dim)
        self.proj_text = build_head(head, text_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learn_scale)

    def head_image(self, x: Tensor) -> Tensor:
        return F.normalize(self.proj_image(self.norm_image(x)), dim=-1)

    def head_text(self, x: Tensor) -> Tensor:
        return F.normalize(self.proj_text(self.norm_text(x)), dim=-1)


def hellinger(x: Tensor) -> Tensor:
    """[N, F] non-negative histograms -> [N, F] element-wise square roots."""
    if (x < 0).any():
        row = int((x < 0).any(1).nonzero()[0])
        raise DataError("features", "non-negative histogram entries for the Hellinger map",
                        f"row {row} has a negative entry")
    return x.sqrt()


def knn_label_votes(queries: Tensor, bank: Tensor, bank_labels: Tensor, k: int, temperature: float) -> Tensor:
    """Soft class votes of each query's ``k`` nearest bank rows by cosine similarity.

    queries: [Q, F]; bank: [N, F]; bank_labels: [N, C] multi-hot -> [Q, C], rows summing to 1.
    A neighbour with cosine s weighs exp((s - 1) / temperature). Bank rows identical in
    direction to the query (s >= 1 - 1e-6) are skipped: a training item must not vote
    for itself (the training features are then leave-one-out), nor may a source row
    that occurs in both train and test hand a test item its training label.
    """
    if k < 1 or k >= bank.shape[0]:
        raise ConfigError(f"knn k: must be in [1, {bank.shape[0] - 1}] for a bank of {bank.shape[0]} rows, got {k}")
    sims = F.normalize(queries.double(), dim=1) @ F.normalize(bank.double(), dim=1).T
    sims = sims.masked_fill(sims >= 1 - 1e-6, float("-inf"))
    top, idx = sims.topk(k, dim=1)
    weights = ((top - 1) / temperature).exp()  # [Q, k]; -inf (skipped) -> 0
    labels = bank_labels.double()
    votes = torch.einsum("qk,qkc->qc", weights, labels[idx] / labels[idx].sum(-1, keepdim=True).clamp_min(1))
    return (votes / votes.sum(1, keepdim=True).clamp_min(1e-12)).float()


def feature_heads_for(train: FeatureSet, embed_dim: int, head: str = "mlp", *, temperature: float = 0.07,
                      learn_scale: bool = True) -> FeatureHeads:
    """A :class:`FeatureHeads` sized for ``train`` and standardised with its statistics."""
    stats = lambda x: (x.float().mean(0), x.float().std(0))
    return FeatureHeads(train.image.shape[1], train.text.shape[1], embed_dim, head, temperature=temperature,
                        learn_scale=learn_scale, image_stats=stats(train.image), text_stats=stats(train.text))


def features_of(features: dict, rows: Sequence[int], labels: Tensor) -> FeatureSet:
    """FeatureSet of one item per row of precomputed ``features['image'|'text']`` ([N, F] arrays).

    labels: [len(rows), C] multi-hot. Each item has exactly one text, so text_item = arange.
    """
    rows = list(rows)
    img = torch.as_tensor(features["image"][rows], dtype=torch.float32)
    txt = torch.as_tensor(features["text"][rows], dtype=torch.float32)
    return FeatureSet(img, txt, torch.arange(len(rows)), labels)


class WithUnpaired(nn.Module):
    """``combined`` on each paired batch, plus its row-wise class-wise terms on a batch of
    unpaired single-modality items.

    unpaired_image: [U_i, F_i] features of items whose text is missing, with labels [U_i, C];
    unpaired_text likewise. Each call draws ``batch_size`` rows of each (with the generator
    ``gen``, so runs are reproducible). The model is held outside the module tree: the
    trainer already optimises its parameters, and listing them twice would break AdamW.
    Returns (total, parts) as :class:`CombinedLoss`; parts gain ``unpaired``.
    """

    def __init__(self, combined: CombinedLoss, model: FeatureHeads, unpaired_image=None, unpaired_text=None,
                 *, batch_size: int, gen: torch.Generator):
        super().__init__()
        self.combined = combined
        self._model = (model,)
        self.unpaired = {"image": unpaired_image, "text": unpaired_text}
        self.batch_size, self.gen = int(batch_size), gen
        self.row_wise = {n: l for n, l in combined.losses.items() if n in ROW_WISE}

    @property
    def requires(self):
        return self.combined.requires

    def forward(self, inputs: LossInputs) -> tuple[Tensor, dict[str, float]]:
        total, parts = self.combined(inputs)
        if not self.row_wise:
            return total, parts
        model = self._model[0]
        extra = None
        for side, pair in self.unpaired.items():
            if pair is None or len(pair[0]) == 0:
                continue
            feats, labels = pair
            pick = torch.randint(len(feats), (min(self.batch_size, len(feats)),), generator=self.gen)
            head = model.head_image if side == "image" else model.head_text
            emb = head(feats[pick].to(inputs.image.device))
            # image=text=emb: a row-wise loss averages over the stacked 2U rows, so the
            # duplicate leaves its value and gradient direction unchanged
            one_side = LossInputs(emb, emb, inputs.logit_scale, torch.arange(len(pick), device=emb.device),
                                  labels=labels[pick].to(emb.device))
            term = sum(self.combined.weights[n] * loss(one_side) for n, loss in self.row_wise.items())
            extra = term if extra is None else extra + term
        if extra is not None:
            parts = {**parts, "unpaired": float(extra.detach())}
            total = total + extra
        return total, parts


#: class logits [N, D] -> [N, C] of the losses that hold a classifier or class anchors, in the
#: order :func:`class_logits` looks for them
CLASS_LOGITS: dict[str, Callable[[nn.Module], Callable[[Tensor], Tensor]]] = {
    "ce": lambda loss: loss.classifier,
    "prototype": lambda loss: (lambda x: (2.0 if loss.scale is None else loss.scale) * x @ loss.prototypes.t()),
    "proxy_nca": lambda loss: (lambda x: -loss.scale * sq_distances(F.normalize(x, dim=1),
                                                                    F.normalize(loss.proxies, dim=1))),
}


def class_logits(loss_fn: CombinedLoss) -> Callable[[Tensor], Tensor] | None:
    """Class logits of the first loss in ``loss_fn`` named in :data:`CLASS_LOGITS`, or None.

    A prototype loss that borrows the model's ``logit_scale`` (``scale=None``) gets scale 2:
    only the ratio to the posterior temperature matters, and that is chosen on validation.
    """
    for name, make in CLASS_LOGITS.items():
        if name in loss_fn.losses:
            return make(loss_fn.losses[name])
    return None


class PosteriorHeads(nn.Module):
    """Class-posterior embeddings from trained heads and a class-logit function.

    head_image: [B, F_i] -> [B, C] softmax(logits(model.head_image(x)) / t_image); head_text
    likewise with t_text. Rows sum to 1 (they are not unit vectors), so the dot product that
    the evaluation ranks by is sum_c p_i(c) p_t(c), the probability that the two items share
    a class if each posterior is right and the two are independent; with single-label
    classes that is the relevance that class-level mAP counts. A temperature per modality
    because the two classifiers are not equally sure: image posteriors from SIFT are far
    flatter than text ones.
    """

    def __init__(self, model: nn.Module, logits: Callable[[Tensor], Tensor], t_image: float, t_text: float):
        super().__init__()
        if not (t_image > 0 and t_text > 0):
            raise ConfigError(f"posterior temperatures must be > 0, got image {t_image!r}, text {t_text!r}")
        self.model, self.logits = model, logits
        self.t_image, self.t_text = float(t_image), float(t_text)

    def head_image(self, x: Tensor) -> Tensor:
        return (self.logits(self.model.head_image(x)) / self.t_image).softmax(dim=-1)

    def head_text(self, x: Tensor) -> Tensor:
        return (self.logits(self.model.head_text(x)) / self.t_text).softmax(dim=-1)
