"""Projection heads: backbone features [B, F] -> joint embedding [B, D], L2-normalised by the caller.

Registered by name so ``params.yaml`` can pick one; each factory takes
``(in_dim, embed_dim)`` and raises ConfigError for a combination it cannot build.
"""
from __future__ import annotations

from torch import nn

from cmr.errors import ConfigError
from cmr.registry import Registry

HEADS: Registry = Registry("head")


@HEADS.register("linear")
def linear_head(in_dim: int, embed_dim: int) -> nn.Module:
    return nn.Linear(in_dim, embed_dim)


@HEADS.register("mlp")
def mlp_head(in_dim: int, embed_dim: int) -> nn.Module:
    """Two layers as in CLIP4CMR's projection; hidden width 2·D as open_clip's timm ``mlp`` projection."""
    hidden = 2 * embed_dim
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, embed_dim))


@HEADS.register("identity")
def identity_head(in_dim: int, embed_dim: int) -> nn.Module:
    """For backbones that already output the joint space (a real CLIP): nothing to learn."""
    if in_dim != embed_dim:
        raise ConfigError(
            f"model.embed_dim: head 'identity' needs embed_dim == backbone width, got embed_dim={embed_dim} "
            f"for a {in_dim}-d backbone; set embed_dim: {in_dim} or use head 'linear'/'mlp'"
        )
    return nn.Identity()


def build_head(kind: str, in_dim: int, embed_dim: int) -> nn.Module:
    try:
        factory = HEADS.get(kind)
    except KeyError as e:
        raise ConfigError(f"model.head: {e.args[0]}") from None
    return factory(in_dim, embed_dim)
