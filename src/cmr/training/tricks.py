"""TBPS-CLIP's training tricks for heads trained on cached backbone features.

:class:`TrickHeads` adds text-feature dropout (and a gradient-free teacher pass) around a
model's heads, :class:`SoftLabel` mixes the teacher's similarity distribution into N-ITC's
identity targets with a warm-up, and :func:`fix_temperature` freezes the logit scale.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cmr.errors import ConfigError
from cmr.losses import CombinedLoss, LossInputs
from cmr.losses.base import positive_mask, soft_cross_entropy
from cmr.losses.pairwise import multi_positive_nce


class TrickHeads(nn.Module):
    """The heads of a two-tower ``model`` with the tricks that act on head inputs.

    dropout: on the text backbone features [B, F_t] while training. TBPS-CLIP puts dropout
    (0.05) inside its text transformer; with the text tower locked it can only act on the
    tower's output. keep_teacher: each training call also runs the head once more without
    gradient (its own dropout draw) and keeps the result, [B, D], in ``teacher`` for
    :class:`SoftLabel`, as TBPS-CLIP's gradient-free second forward pass.
    """

    def __init__(self, model: nn.Module, dropout: float = 0.0, keep_teacher: bool = False):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"tbps trick dropout: must be in [0, 1), got {dropout!r}")
        self.model = model
        self.text_dropout = nn.Dropout(dropout)
        self.keep_teacher = keep_teacher
        self.teacher: dict[str, Tensor] = {}

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    def _run(self, side: str, head, feats: Tensor, drop) -> Tensor:
        if self.training and self.keep_teacher:
            with torch.no_grad():
                self.teacher[side] = head(drop(feats))
        return head(drop(feats))

    def head_image(self, feats: Tensor) -> Tensor:
        return self._run("image", self.model.head_image, feats, lambda x: x)

    def head_text(self, feats: Tensor) -> Tensor:
        return self._run("text", self.model.head_text, feats, self.text_dropout)


class SoftLabel(nn.Module):
    """TBPS-CLIP's soft label on N-ITC: the identity targets q become (1 - a) q + a softmax(s T_i T_t^T)
    with T the teacher embeddings of :class:`TrickHeads`, both directions. a rises linearly from
    0 to ``ratio`` over the first ``warmup_steps`` training calls, then stays (TBPS-CLIP ramps it
    over the first epoch).

    Cross-entropy is linear in its target, so this adds w a (CE(logits, softmax(teacher)) - N-ITC)
    to ``combined``'s total, w being N-ITC's weight there. When the teacher equals the student
    (no dropout) the added CE has zero gradient (E_p[grad log p] = 0): the trick then only
    scales N-ITC by 1 - a. Returns (total, parts) as :class:`CombinedLoss`; parts gain ``soft``.
    """

    def __init__(self, combined: CombinedLoss, heads: TrickHeads, ratio: float, warmup_steps: int):
        super().__init__()
        if "nitc" not in combined.losses:
            raise ConfigError("tbps trick softlabel_ratio: needs the nitc loss in the combination")
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(f"tbps trick softlabel_ratio: must be in (0, 1], got {ratio!r}")
        self.combined = combined
        self._heads = (heads,)  # outside the module tree: the trainer already optimises the heads
        self.ratio, self.warmup_steps, self.step = float(ratio), max(1, int(warmup_steps)), 0

    @property
    def requires(self):
        return self.combined.requires

    def alpha(self) -> float:
        return self.ratio * min(1.0, self.step / self.warmup_steps)

    def forward(self, inputs: LossInputs) -> tuple[Tensor, dict[str, float]]:
        total, parts = self.combined(inputs)
        teacher = self._heads[0].teacher
        if not self.training or not teacher:
            return total, parts
        alpha = self.alpha()
        self.step += 1
        logits = inputs.logits().float()
        with torch.no_grad():
            t_logits = inputs.logit_scale.float() * teacher["image"].float() @ teacher["text"].float().t()
        soft = 0.5 * (soft_cross_entropy(logits, t_logits.softmax(1))
                      + soft_cross_entropy(logits.t(), t_logits.t().softmax(1)))
        hard = multi_positive_nce(logits, positive_mask(inputs, "identity"))
        added = self.combined.weights["nitc"] * alpha * (soft - hard)
        return total + added, {**parts, "soft": float(soft.detach())}


def fix_temperature(model: nn.Module, temperature: float) -> None:
    """Freeze ``model.logit_scale`` at log(1 / temperature) (TBPS-CLIP learns it from 0.07)."""
    if not temperature > 0:
        raise ConfigError(f"tbps trick temperature: must be > 0, got {temperature!r}")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1.0 / temperature))
    model.logit_scale.requires_grad_(False)
