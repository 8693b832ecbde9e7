"""Normalized Contrastive Learning (Park et al. 2022, "Normalized Contrastive Learning for
Text-Video Retrieval").

In plain contrastive learning the retrieval probabilities of a gallery item, summed over
all queries, are not 1: some items are over-represented (hubs), others never retrieved.
NCL adds an instance-wise bias b_j to every gallery item inside the softmax,

    p(j | i) = softmax_j(L_ij + b_j),

with the biases chosen by Sinkhorn-Knopp so that every item's summed probability is 1
(the batch plan exp(L_ij + a_i + b_j) is doubly normalised). The biases are constants for
the gradient. Here the batch itself is the query set (NCL also keeps a queue of earlier
queries; that is left to a caller that holds one).
"""
from __future__ import annotations

import torch
from torch import Tensor

from cmr.losses.base import Loss, LossInputs, register_loss, same_key, soft_cross_entropy, soft_targets


@torch.no_grad()
def sinkhorn_biases(logits: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """Log-domain Sinkhorn-Knopp on a square [N, N] logit matrix.

    Returns (a [N], b [N]) such that P = exp(logits + a[:, None] + b[None, :]) has unit row
    and column sums in the limit. The last update is b, so the columns are exactly
    normalised after any number of iterations; rows converge. No gradient flows.
    """
    a = logits.new_zeros(logits.shape[0])
    b = logits.new_zeros(logits.shape[1])
    for _ in range(iterations):
        a = -torch.logsumexp(logits + b[None, :], dim=1)
        b = -torch.logsumexp(logits + a[:, None], dim=0)
    return a, b


@register_loss("ncl")
class NormalizedContrastive(Loss):
    """NCL: symmetric multi-positive InfoNCE (as ``infonce``) with Sinkhorn gallery biases.

    image->text: CE(L + eps * b_text), text->image: CE(L^T + eps * b_image), where L is the
    [B, B] scaled similarity matrix and b_text, b_image come from Sinkhorn on L / eps and
    L^T / eps (one run per direction, so the loss is exactly symmetric in image/text).

    Options: ``iterations`` Sinkhorn iterations (default 10; the biases need only to be
    close, and each costs two logsumexps over B x B); ``epsilon`` the temperature of the
    balancing relative to the loss's own (default 1: at convergence the biased softmax
    is exactly the balanced plan; larger values balance more softly). When the batch is already
    balanced (e.g. exp(L) has equal row and column sums) the biases are constant and NCL
    equals InfoNCE.
    """

    def __init__(self, embed_dim: int, num_classes: int, *, iterations: int = 10, epsilon: float = 1.0):
        super().__init__(embed_dim, num_classes)
        self.check("iterations", isinstance(iterations, int) and iterations >= 1, "must be an integer >= 1",
                   iterations)
        self.check("epsilon", epsilon > 0, "must be > 0", epsilon)
        self.iterations, self.epsilon = int(iterations), float(epsilon)

    def gallery_biases(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """[B, B] logits (image rows) -> (text biases [B], image biases [B]), in logit units."""
        eps = self.epsilon
        _, text_bias = sinkhorn_biases(logits.detach() / eps, self.iterations)
        _, image_bias = sinkhorn_biases(logits.detach().t() / eps, self.iterations)
        return eps * text_bias, eps * image_bias

    def forward(self, inputs: LossInputs) -> Tensor:
        logits = inputs.logits()
        text_bias, image_bias = self.gallery_biases(logits)
        positives = same_key(inputs.item)
        i2t = soft_cross_entropy(logits + text_bias[None, :], soft_targets(positives))
        t2i = soft_cross_entropy(logits.t() + image_bias[None, :], soft_targets(positives.t()))
        return 0.5 * (i2t + t2i)
