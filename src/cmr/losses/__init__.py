"""Training losses for cross-modal retrieval, by name.

``build_loss({"infonce": 1.0, "ce": 0.5}, options, embed_dim, num_classes)`` returns a
:class:`CombinedLoss`; ``LOSSES.names()`` lists what is registered. Families:
pair-wise (:mod:`.pairwise`), class-wise (:mod:`.classwise`), person search
(:mod:`.person`) and NCL (:mod:`.ncl`).
"""
from cmr.losses.base import LOSSES, CombinedLoss, Loss, LossInputs, build_loss, register_loss
from cmr.losses import classwise, ncl, pairwise, person  # noqa: F401  (registers the losses)
from cmr.losses.ncl import sinkhorn_biases

__all__ = ["LOSSES", "CombinedLoss", "Loss", "LossInputs", "build_loss", "register_loss", "sinkhorn_biases"]
