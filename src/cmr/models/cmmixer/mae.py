"""Masked autoencoder over mixed video/audio images: fuse, then separate.

The encoder sees the visible tokens of the mixer's streams (:mod:`.mixers`); one shared
decoder with one linear head per modality reconstructs the ORIGINAL, unmixed video image
and mel image. The loss is the pixel MSE on masked patches only (He et al. 2022, "Masked
Autoencoders Are Scalable Vision Learners"), averaged over the reconstructed modalities.

Masking is per stream: each stream of N patches has exactly round(mask_ratio * N) masked
(half rounds up). With one mixed stream, both heads read the same decoded tokens; with
one stream per modality (mixers ``none``, ``token``), each head reads its own stream.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cmr.errors import ConfigError
from cmr.models.cmmixer.archs import CMMixerArch, get_arch
from cmr.models.cmmixer.mixers import MODALITIES, MixOutput
from cmr.models.cmmixer.vit import KINDS, ViTEncoder, init_weights, sincos_2d, transformer_blocks

NORM_PIX_EPS = 1e-6  # MAE's epsilon in the per-patch normalisation of targets


def patchify(images: Tensor, patch: int) -> Tensor:
    """[B, C, h*p, w*p] -> [B, h*w, p*p*C]; patches row-major over the (possibly non-square) grid,
    pixels inside a patch in (row, column, channel) order."""
    b, c, height, width = images.shape
    h, w = height // patch, width // patch
    x = images.reshape(b, c, h, patch, w, patch)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, h * w, patch * patch * c)


def unpatchify(patches: Tensor, grid: tuple[int, int], patch: int, channels: int = 3) -> Tensor:
    """Inverse of :func:`patchify`: [B, h*w, p*p*C] -> [B, C, h*p, w*p]."""
    b = patches.shape[0]
    h, w = grid
    x = patches.reshape(b, h, w, patch, patch, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, channels, h * patch, w * patch)


def n_masked(n_tokens: int, ratio: float) -> int:
    """round(ratio * n_tokens), half up."""
    return int(math.floor(ratio * n_tokens + 0.5))


def random_masking(batch: int, n_tokens: int, ratio: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(ids_keep long [B, N - k], mask bool [B, N]) with exactly k = round(ratio * N) True (masked) per row."""
    k = n_masked(n_tokens, ratio)
    if not 0 < k < n_tokens:
        raise ConfigError(f"mask_ratio {ratio}: masks {k} of {n_tokens} tokens; need at least one masked and "
                          "one visible")
    order = torch.argsort(torch.rand(batch, n_tokens, generator=generator), dim=1)
    ids_keep = order[:, : n_tokens - k]
    mask = torch.ones(batch, n_tokens, dtype=torch.bool)
    mask.scatter_(1, ids_keep, False)
    return ids_keep, mask


def pixel_targets(image: Tensor, patch: int, norm_pix: bool) -> Tensor:
    """[B, 3, H, W] -> [B, N, p*p*3]; with ``norm_pix`` each patch is standardised (MAE's norm_pix_loss)."""
    target = patchify(image.float(), patch)
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + NORM_PIX_EPS).sqrt()
    return target


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean over masked patches of the per-patch mean squared error.

    pred, target: [B, N, P]; mask: bool [B, N], True = masked (counted). Visible patches
    contribute nothing, whatever their prediction.
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum()


@dataclass
class MAEOutput:
    """loss: scalar; parts: {"loss/video": float, ...}; pred/masks per reconstructed modality:
    predicted patches [B, N, p*p*3] (in target space: standardised patches with norm_pix) and
    the bool [B, N] mask of the stream they come from; grid: (h, w)."""

    loss: Tensor
    parts: dict[str, float]
    pred: dict[str, Tensor]
    masks: dict[str, Tensor]
    grid: tuple[int, int]


class CMMixerMAE(nn.Module):
    """Encoder (:class:`ViTEncoder`) + one shared decoder + a linear pixel head per modality."""

    def __init__(self, arch: str | CMMixerArch, norm_pix_loss: bool = False):
        super().__init__()
        self.arch = arch = get_arch(arch)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.encoder = ViTEncoder(arch)
        self.decoder_embed = nn.Linear(arch.dim, arch.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, arch.decoder_dim))
        self.decoder_modality_embed = nn.Parameter(torch.zeros(len(KINDS), arch.decoder_dim))
        self.decoder_blocks = transformer_blocks(arch.decoder_dim, arch.decoder_depth, arch.decoder_heads,
                                                 arch.mlp_ratio)
        self.decoder_norm = nn.LayerNorm(arch.decoder_dim)
        pixels = arch.patch_size ** 2 * 3
        self.heads = nn.ModuleDict({m: nn.Linear(arch.decoder_dim, pixels) for m in MODALITIES})
        init_weights(self.decoder_blocks)
        init_weights(self.heads)
        init_weights(self.decoder_embed)
        nn.init.normal_(self.mask_token, std=0.02)

    def spec(self) -> dict:
        return {"kind": "mae", "arch": self.arch.name, "arch_config": self.arch.to_dict(),
                "norm_pix_loss": self.norm_pix_loss}

    def _decode(self, latent: Tensor, keeps: list[Tensor], kinds: list[str], grid: tuple[int, int]) -> list[Tensor]:
        """Encoder output [B, 1 + visible, dim] -> decoded tokens [B, N, decoder_dim] per stream."""
        x = self.decoder_embed(latent)
        cls, visible = x[:, :1], x[:, 1:]
        n = grid[0] * grid[1]
        pos = sincos_2d(*grid, self.arch.decoder_dim).to(x.device, x.dtype)
        streams, start = [], 0
        for ids_keep, kind in zip(keeps, kinds):
            chunk = visible[:, start : start + ids_keep.shape[1]]
            start += ids_keep.shape[1]
            full = self.mask_token.to(x.dtype).expand(x.shape[0], n, -1)
            full = full.scatter(1, ids_keep[..., None].expand(-1, -1, x.shape[-1]), chunk)
            streams.append(full + pos + self.decoder_modality_embed[KINDS.index(kind)])
        y = torch.cat([cls, *streams], dim=1)
        for block in self.decoder_blocks:
            y = block(y)
        y = self.decoder_norm(y)[:, 1:]
        return list(y.split(n, dim=1))

    def forward(self, mix: MixOutput, originals: dict[str, Tensor], mask_ratio: float,
                generator: torch.Generator) -> MAEOutput:
        """mix: the mixer's output; originals: {modality: unmixed image [B, 3, H, W]} for every target.

        Every stream must share one patch grid (video frames and mel bins of one size).
        """
        visible, keeps, masks, grids = [], [], [], set()
        for stream, kind in zip(mix.streams, mix.kinds):
            tokens, grid = self.encoder.embed(stream, kind)
            grids.add(grid)
            ids_keep, mask = random_masking(tokens.shape[0], tokens.shape[1], mask_ratio, generator)
            ids_keep, mask = ids_keep.to(tokens.device), mask.to(tokens.device)
            visible.append(tokens.gather(1, ids_keep[..., None].expand(-1, -1, tokens.shape[-1])))
            keeps.append(ids_keep)
            masks.append(mask)
        if len(grids) != 1:
            raise ConfigError(f"cmmixer MAE: streams have different patch grids {sorted(grids)}; use mel bins "
                              "equal to the frame size")
        grid = grids.pop()
        decoded = self._decode(self.encoder.encode_tokens(torch.cat(visible, dim=1)), keeps, mix.kinds, grid)
        pred, mask_of = {}, {}
        for tokens, mask, targets in zip(decoded, masks, mix.targets):
            for modality in targets:
                pred[modality], mask_of[modality] = self.heads[modality](tokens), mask
        # the loss in float32 whatever the autocast context: squared pixel errors are small numbers
        with torch.autocast(device_type=pred[next(iter(pred))].device.type, enabled=False):
            losses = {m: masked_mse(pred[m], pixel_targets(originals[m], self.arch.patch_size, self.norm_pix_loss),
                                    mask_of[m]) for m in pred}
        total = torch.stack(list(losses.values())).mean()
        return MAEOutput(total, {f"loss/{m}": float(v.detach()) for m, v in losses.items()}, pred, mask_of, grid)

    def reconstruct(self, out: MAEOutput, originals: dict[str, Tensor]) -> dict[str, Tensor]:
        """{modality: [B, 3, H, W]}: predicted pixels on masked patches, the original on visible ones.

        With norm_pix_loss the predictions are mapped back with each original patch's mean and std.
        """
        images = {}
        for m, pred in out.pred.items():
            raw = patchify(originals[m].float(), self.arch.patch_size)
            pred = pred.float()
            if self.norm_pix_loss:
                mean, var = raw.mean(dim=-1, keepdim=True), raw.var(dim=-1, keepdim=True)
                pred = pred * (var + NORM_PIX_EPS).sqrt() + mean
            merged = torch.where(out.masks[m][..., None], pred, raw)
            images[m] = unpatchify(merged, out.grid, self.arch.patch_size)
        return images
