"""The loss interface: what every loss reads, how losses register, and how several combine.

A loss is an ``nn.Module`` registered under a name in :data:`LOSSES` and built as
``Cls(embed_dim, num_classes, **options)``. It reads one :class:`LossInputs` and
returns a scalar. Its own parameters (classifiers, proxies, centres) are trained
together with the model: the trainer optimises ``CombinedLoss.parameters()``.

Positives are explicit: two pairs are positives of each other when their ``item``
is equal (one image with two captions, a duplicated caption), when they share a
class label (class-wise losses) or an identity (person search). Every match
counts; a batch never assumes that only the diagonal matches.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmr.errors import ConfigError
from cmr.registry import Registry, nearest

LOSSES: Registry[type["Loss"]] = Registry("loss")

#: inputs that only datasets with classes or identities provide (``num_classes > 0``)
CLASS_INPUTS = frozenset({"labels", "identity"})


@dataclass
class LossInputs:
    """One batch of B paired embeddings and what is known about them.

    image:       [B, D] float, L2-normalised image (or audio/video/feature) embeddings
    text:        [B, D] float, L2-normalised text embeddings; row b pairs with image row b
    logit_scale: [] float, exp'd learnable scale (1 / temperature)
    item:        [B] long, item index; equal items are positives of each other
    labels:      [B, C] float multi-hot class labels, or None
    identity:    [B] long person identity in [0, C), or None
    """

    image: Tensor
    text: Tensor
    logit_scale: Tensor
    item: Tensor
    labels: Tensor | None = None
    identity: Tensor | None = None

    def logits(self) -> Tensor:
        """[B, B] scaled cosine similarities; rows are images, columns texts."""
        return self.logit_scale * (self.image @ self.text.t())


class Loss(nn.Module):
    """Base class. Subclasses take keyword-only options and set ``requires``.

    ``requires`` names the optional :class:`LossInputs` fields the loss reads; it
    may depend on options (e.g. ``positives="labels"``), so read it on the instance.
    """

    name: str = "?"
    requires: frozenset[str] = frozenset()

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__()
        self.embed_dim, self.num_classes = int(embed_dim), int(num_classes)

    def forward(self, inputs: LossInputs) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, option: str, ok: bool, rule: str, value) -> None:
        """Raise ConfigError naming this loss and option unless ``ok``."""
        if not ok:
            raise ConfigError(f"loss {self.name!r}: option {option!r} {rule} (got {value!r})")


def register_loss(name: str):
    """Class decorator: register under ``name`` and remember the name for messages."""

    def decorator(cls: type[Loss]) -> type[Loss]:
        cls.name = name
        return LOSSES.register(name)(cls)

    return decorator


# ---------------------------------------------------------------- shared pieces
def same_key(keys: Tensor) -> Tensor:
    """[B] keys -> [B, B] bool, True where keys are equal."""
    return keys[:, None] == keys[None, :]


def share_label(labels: Tensor) -> Tensor:
    """[B, C] multi-hot -> [B, B] bool, True where two rows share at least one label."""
    return (labels @ labels.t()) > 0


def positive_mask(inputs: LossInputs, by: str) -> Tensor:
    """[B, B] bool positives: same item, plus a shared label or identity when ``by`` says so."""
    mask = same_key(inputs.item)
    if by == "labels":
        mask = mask | share_label(inputs.labels)
    elif by == "identity":
        mask = mask | same_key(inputs.identity)
    return mask


def soft_targets(mask: Tensor) -> Tensor:
    """[N, M] bool positives -> rows spread uniformly over their positives (rows without any stay 0)."""
    mask = mask.float()
    return mask / mask.sum(dim=1, keepdim=True).clamp_min(1.0)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of -sum_j targets_ij log softmax(logits_i)_j; [N, M] each -> scalar.

    With one positive per row this is the usual cross-entropy; with k positives it
    averages -log p over them (SupCon's L_out), so its minimum is log k, not 0.
    Rows whose targets are all zero are left out; with none left the loss is 0.
    """
    per_row = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)
    # dividing by the kept count (not indexing the kept rows) avoids a host sync on GPU
    kept = (targets.sum(dim=1) > 0).sum().clamp_min(1)
    return per_row.sum() / kept


def kl_prediction_to_target(logits: Tensor, targets: Tensor, eps: float) -> Tensor:
    """Mean over rows of KL(softmax(logits_i) || q_i), q_i = (targets_i + eps) renormalised.

    logits, targets: [N, M]; targets rows sum to 1. The renormalisation shifts the
    loss by a constant only (same gradient as the unnormalised form), and keeps it
    >= 0 with equality where the prediction equals the smoothed target.
    """
    log_p = F.log_softmax(logits, dim=1)
    log_q = torch.log(targets + eps) - math.log1p(eps * targets.shape[1])
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


def both_modalities(inputs: LossInputs) -> Tensor:
    """[2B, D]: image rows then text rows, for losses that treat both alike (shared classifiers)."""
    return torch.cat([inputs.image, inputs.text], dim=0)


# ---------------------------------------------------------------- combination
class CombinedLoss(nn.Module):
    """Weighted sum of registered losses.

    forward(inputs) -> (total: scalar Tensor, parts: {name: unweighted float value}).
    Losses run in float32 with autocast off: scales of ~100 inside ``exp`` and the
    Sinkhorn iterations are not safe in half precision.
    """

    def __init__(self, losses: dict[str, Loss], weights: dict[str, float]):
        super().__init__()
        self.losses = nn.ModuleDict(losses)
        self.weights = dict(weights)

    @property
    def requires(self) -> frozenset[str]:
        return frozenset().union(*(loss.requires for loss in self.losses.values()))

    def forward(self, inputs: LossInputs) -> tuple[Tensor, dict[str, float]]:
        inputs = _float32(inputs)
        total, parts = None, {}
        with torch.autocast(device_type=inputs.image.device.type, enabled=False):
            for name, loss in self.losses.items():
                missing = sorted(f for f in loss.requires if getattr(inputs, f) is None)
                if missing:
                    raise ValueError(f"loss {name!r} needs LossInputs.{', '.join(missing)}, which is None")
                value = loss(inputs)
                parts[name] = float(value.detach())
                weighted = self.weights[name] * value
                total = weighted if total is None else total + weighted
        return total, parts


def _float32(inputs: LossInputs) -> LossInputs:
    changed = {
        f.name: getattr(inputs, f.name).float()
        for f in fields(inputs)
        if isinstance(getattr(inputs, f.name), Tensor) and getattr(inputs, f.name).is_floating_point()
    }
    return LossInputs(**{**{f.name: getattr(inputs, f.name) for f in fields(inputs)}, **changed})


def _option_names(cls: type[Loss]) -> list[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _check_weight(name: str, weight) -> float:
    ok = isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight) and weight >= 0
    if not ok:
        raise ConfigError(f"losses.{name}: weight must be a finite number >= 0 (got {weight!r})")
    return float(weight)


def _check_names(names, where: str) -> None:
    registered = LOSSES.names()
    for name in names:
        if name not in LOSSES:
            raise ConfigError(
                f"{where}: unknown loss {name!r}{nearest(name, registered)}; registered: {', '.join(registered)}"
            )


def _check_options(weights: dict, options: dict) -> None:
    _check_names(options, "loss_options")
    for name, opts in options.items():
        if name not in weights:
            raise ConfigError(f"loss_options.{name}: options for a loss that is not in losses ({sorted(weights)})")
        if not isinstance(opts, dict):
            raise ConfigError(f"loss_options.{name}: must be a mapping of option -> value (got {opts!r})")
        allowed = _option_names(LOSSES.get(name))
        for option in opts:
            if option not in allowed:
                raise ConfigError(
                    f"loss_options.{name}: unknown option {option!r} for loss {name!r}{nearest(option, allowed)}; "
                    f"allowed: {', '.join(allowed) or 'none'}"
                )


def build_loss(weights: dict[str, float], options: dict[str, dict] | None, embed_dim: int,
               num_classes: int) -> CombinedLoss:
    """Build ``sum_name weights[name] * LOSSES[name](embed_dim, num_classes, **options[name])``.

    ``num_classes`` is the label count (class-wise losses) or the identity count (``id``);
    0 means the dataset has neither. Zero weights switch a loss off (its options are still
    checked). Raises ConfigError for an empty or all-zero ``weights``, a negative weight, an
    unknown loss or option name, or a loss that needs labels/identities when there are none.
    """
    options = dict(options or {})
    if not weights:
        raise ConfigError("losses: empty; name at least one loss with a positive weight, e.g. {'infonce': 1.0}")
    _check_names(weights, "losses")
    _check_options(weights, options)
    active = {name: w for name, w in ((n, _check_weight(n, w)) for n, w in weights.items()) if w > 0}
    if not active:
        raise ConfigError(f"losses: every weight is zero ({weights}); give at least one a positive weight")
    built = {}
    for name in active:
        cls = LOSSES.get(name)
        _check_classes(name, cls.requires, num_classes)
        built[name] = cls(embed_dim, num_classes, **options.get(name, {}))
        _check_classes(name, built[name].requires, num_classes)  # options may widen what it reads
    return CombinedLoss(built, active)


def _check_classes(name: str, requires: frozenset[str], num_classes: int) -> None:
    needs = sorted(requires & CLASS_INPUTS)
    if needs and num_classes <= 0:
        raise ConfigError(
            f"losses.{name}: needs {' and '.join(needs)}, but the dataset has none (num_classes == {num_classes})"
        )
