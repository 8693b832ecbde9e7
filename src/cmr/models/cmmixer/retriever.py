"""Retriever built from the pre-trained CMMixer encoder: side a (gallery) and side b (queries).

Each side's input is frames (video, or a still image as T = 1) uint8 [B, T, 3, S, S] or a
log-mel float [B, M, T*S]; :func:`input_kind` tells which from the tensor. Registered in
:data:`RETRIEVERS`:

* ``two_tower``: a separate copy of the encoder per side (the paper's retriever);
* ``shared``:   one encoder for both sides; the modality embedding tells it what it reads.

Both: a linear projection per side to ``embed_dim``, L2-normalised outputs, and a learnable
``logit_scale`` (log 1/0.07 at start, CLIP's). ``pool`` is ``cls`` (the CLS token) or
``mean`` (mean of the patch tokens).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmr.errors import ConfigError, DataError
from cmr.models.cmmixer.as_images import mel_as_image, video_as_image
from cmr.models.cmmixer.archs import CMMixerArch, get_arch
from cmr.models.cmmixer.vit import ViTEncoder
from cmr.registry import Registry

SIDES = ("a", "b")
POOLS = ("cls", "mean")
INIT_LOGIT_SCALE = math.log(1 / 0.07)


def input_kind(x: Tensor, where: str = "input") -> str:
    """'video' for uint8 [N, T, 3, S, S] frames, 'audio' for a float [N, M, L] log-mel; else DataError."""
    if x.dim() == 5 and x.dtype == torch.uint8:
        return "video"
    if x.dim() == 3 and x.is_floating_point():
        return "audio"
    raise DataError(where, "frames uint8 [N, T, 3, S, S] or log-mel float [N, M, T*S]",
                    f"got {x.dtype} {tuple(x.shape)}")


AS_IMAGE: dict[str, Callable[[Tensor], Tensor]] = {"video": video_as_image, "audio": mel_as_image}


def as_image(x: Tensor) -> Tensor:
    """Frames or mel -> the [B, 3, H, W] image the encoder reads."""
    return AS_IMAGE[input_kind(x)](x)


class CMMixerRetriever(nn.Module):
    """forward(x, side) -> [B, embed_dim] unit vectors; ``kinds`` = (kind of side a, kind of side b)."""

    def __init__(self, arch: str | CMMixerArch, *, shared: bool, embed_dim: int, kinds: tuple[str, str],
                 pool: str = "cls", encoder_state: dict[str, Tensor] | None = None):
        super().__init__()
        if pool not in POOLS:
            raise ConfigError(f"pool {pool!r}: one of {POOLS}")
        self.arch, self.shared, self.pool = get_arch(arch), bool(shared), pool
        self.embed_dim, self.kinds = int(embed_dim), dict(zip(SIDES, kinds))
        encoder = ViTEncoder(self.arch)
        if encoder_state is not None:
            encoder.load_state_dict(encoder_state, strict=True)
        copies = {"shared": encoder} if shared else {"a": encoder, "b": _copy(encoder)}
        self.encoders = nn.ModuleDict(copies)
        self.projections = nn.ModuleDict({s: nn.Linear(self.arch.dim, self.embed_dim) for s in SIDES})
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))

    def spec(self) -> dict:
        return {"kind": "retriever", "arch": self.arch.name, "arch_config": self.arch.to_dict(), "retriever": "shared" if self.shared else "two_tower",
                "embed_dim": self.embed_dim, "pool": self.pool, "kinds": [self.kinds[s] for s in SIDES]}

    def encoder(self, side: str) -> ViTEncoder:
        return self.encoders["shared" if self.shared else side]

    def forward(self, x: Tensor, side: str) -> Tensor:
        kind = input_kind(x, f"side {side}")
        if kind != self.kinds[side]:
            raise DataError(f"side {side}", f"input is {self.kinds[side]} (as the retriever was built)",
                            f"got {kind}")
        image = as_image(x.to(self.logit_scale.device))
        tokens = self.encoder(side)(image, kind)
        pooled = tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)
        return F.normalize(self.projections[side](pooled).float(), dim=-1)


def _copy(encoder: ViTEncoder) -> ViTEncoder:
    twin = ViTEncoder(encoder.arch)
    twin.load_state_dict(encoder.state_dict())
    return twin


RETRIEVERS: Registry[Callable[..., CMMixerRetriever]] = Registry("cmmixer retriever")


@RETRIEVERS.register("two_tower")
def two_tower(arch, *, embed_dim: int, kinds: tuple[str, str], pool: str = "cls",
              encoder_state: dict[str, Tensor] | None = None) -> CMMixerRetriever:
    return CMMixerRetriever(arch, shared=False, embed_dim=embed_dim, kinds=kinds, pool=pool,
                            encoder_state=encoder_state)


@RETRIEVERS.register("shared")
def shared(arch, *, embed_dim: int, kinds: tuple[str, str], pool: str = "cls",
           encoder_state: dict[str, Tensor] | None = None) -> CMMixerRetriever:
    return CMMixerRetriever(arch, shared=True, embed_dim=embed_dim, kinds=kinds, pool=pool,
                            encoder_state=encoder_state)
