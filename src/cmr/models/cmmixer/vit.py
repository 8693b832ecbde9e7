"""The ViT encoder that a CMMixer architecture (:mod:`.archs`, ``configs/cmmixer-*.json``) describes.

The encoder is a plain pre-norm ViT (Dosovitskiy et al. 2021) over 16 x 16 patches with a
CLS token, FIXED 2-D sin-cos positions computed for whatever h x w patch grid the input
has (a clip of T frames of S pixels gives an S/p x T*S/p grid, non-square), and a learned
modality embedding (video, audio or mixed) added to every patch token. The embedding starts
at zero, so a stream kind never seen in pre-training starts as a no-op.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from cmr.errors import DataError
from cmr.models.cmmixer.archs import CMMixerArch, get_arch

KINDS = ("video", "audio", "mixed")  # stream kinds; the index selects the modality embedding


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """[P] positions -> [P, dim]: sin of dim/2 frequencies 1/10000^(2i/dim), then cos of the same."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


@functools.lru_cache(maxsize=16)
def sincos_2d(height: int, width: int, dim: int) -> Tensor:
    """float32 [height * width, dim], row-major over the grid: half the width encodes the row, half the column."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, rows.flatten()), sincos_1d(dim // 2, cols.flatten())], dim=1)
    return emb.float()


def transformer_blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.ModuleList:
    """Pre-norm blocks (LN -> attention -> LN -> GELU MLP), no dropout, as in MAE's ViT."""
    return nn.ModuleList([
        nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout=0.0, activation="gelu",
                                   batch_first=True, norm_first=True)
        for _ in range(depth)
    ])


def init_weights(module: nn.Module) -> None:
    """Xavier-uniform linear layers with zero bias (MAE's choice); the patch projection like a linear layer."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))


def grid_of(image: Tensor, patch: int) -> tuple[int, int]:
    """(h, w) patch grid of [B, C, H, W]; DataError if a side is not a multiple of ``patch``."""
    height, width = image.shape[-2:]
    if height % patch or width % patch:
        raise DataError("cmmixer input", f"image sides are multiples of the patch size {patch}",
                        f"got {height} x {width}")
    return height // patch, width // patch


class ViTEncoder(nn.Module):
    """Patch embedding + modality embedding + fixed positions, CLS, pre-norm blocks, final LayerNorm."""

    def __init__(self, arch: str | CMMixerArch):
        super().__init__()
        self.arch = arch = get_arch(arch)
        self.patch_embed = nn.Conv2d(3, arch.dim, arch.patch_size, stride=arch.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, arch.dim))
        self.modality_embed = nn.Parameter(torch.zeros(len(KINDS), arch.dim))
        self.blocks = transformer_blocks(arch.dim, arch.depth, arch.heads, arch.mlp_ratio)
        self.norm = nn.LayerNorm(arch.dim)
        init_weights(self)
        nn.init.normal_(self.cls_token, std=0.02)

    def embed(self, image: Tensor, kind: str) -> tuple[Tensor, tuple[int, int]]:
        """[B, 3, H, W] -> (patch tokens [B, h*w, dim] with positions and modality added, (h, w))."""
        grid = grid_of(image, self.arch.patch_size)
        tokens = self.patch_embed(image).flatten(2).transpose(1, 2)
        pos = sincos_2d(*grid, self.arch.dim).to(tokens.device, tokens.dtype)
        return tokens + pos + self.modality_embed[KINDS.index(kind)], grid

    def encode_tokens(self, tokens: Tensor) -> Tensor:
        """[B, L, dim] patch tokens -> [B, 1 + L, dim]: CLS first, after the blocks and the final norm."""
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, image: Tensor, kind: str) -> Tensor:
        """Unmasked: [B, 3, H, W] -> [B, 1 + h*w, dim]."""
        return self.encode_tokens(self.embed(image, kind)[0])
