"""Several image trunks side by side: one image in, their pooled features concatenated out.

A feature ensemble of frozen towers: ImageNet networks of different depth and input size make
different mistakes, and a linear head over their joined features can weigh them (on Flickr8k
Lite0 + Lite2 gave a dev rsum of 321.8 against 302.7 for Lite2 alone, docs/flickr8k.md). The
image is preprocessed once at the largest trunk's size; each smaller trunk sees it resized
(bicubic, antialiased) to its own native size, so every trunk runs at the resolution it was
trained at.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ConcatVisual(nn.Module):
    """``towers[k]``: an image module [B, 3, s_k, s_k] -> [B, F_k]; forward: pixels [B, 3, S, S]
    (S = max s_k) -> [B, sum F_k], the towers' outputs in the given order.

    ``image_size`` and ``preprocess_cfg`` are what open_clip reads from a ``visual`` module to
    build the image transforms (:func:`open_clip.get_model_preprocess_cfg`).
    """

    def __init__(self, towers: Sequence[nn.Module], sizes: Sequence[int], preprocess_cfg: dict):
        super().__init__()
        if len(towers) != len(sizes) or len(towers) < 2:
            raise ValueError(f"ConcatVisual: {len(towers)} towers and {len(sizes)} sizes; give two or more, one size each")
        self.towers = nn.ModuleList(towers)
        self.sizes = tuple(int(s) for s in sizes)
        self.image_size = (max(self.sizes),) * 2
        self.preprocess_cfg = {**preprocess_cfg, "size": self.image_size}

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        outs = []
        for tower, size in zip(self.towers, self.sizes):
            x = pixels
            if tuple(pixels.shape[-2:]) != (size, size):
                x = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
            outs.append(tower(x))
        return torch.cat(outs, dim=-1)
