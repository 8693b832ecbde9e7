"""The two-tower retrieval model: pretrained open_clip backbones plus trainable projection heads.

``encode_image = head_image ∘ backbone_image``; the split lets a trainer cache frozen
backbone features once and train only the heads on them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmr.errors import ConfigError
from cmr.registry import nearest

# Top-level parameters of an open_clip model that belong to neither tower.
_SHARED = ("logit_scale", "logit_bias")


@dataclasses.dataclass(frozen=True)
class TowerSpec:
    """Everything needed to rebuild a two-tower model and its preprocessing (saved as ``spec.json``)."""

    arch: str
    pretrained: str
    embed_dim: int
    head: str
    image_dim: int
    text_dim: int
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    resize_mode: str
    context_length: int
    normalize_text_backbone: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, where: str = "spec") -> "TowerSpec":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(raw) - set(names))
        missing = sorted(set(names) - set(raw))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}{nearest(unknown[0], names)}")
        if missing:
            raise ConfigError(f"{where}: missing key {missing[0]!r}")
        tuples = {k: tuple(raw[k]) for k in ("image_size", "mean", "std")}
        return cls(**{**raw, **tuples})


class TowerBundle(NamedTuple):
    model: "TwoTower"
    preprocess_train: Callable  # PIL image -> Tensor[3, H, W]
    preprocess_val: Callable
    tokenizer: Callable  # list[str] -> LongTensor[B, L]
    spec: TowerSpec


class TwoTower(nn.Module):
    """Image and text backbones (one open_clip model) with a projection head per modality.

    Args:
        clip: an open_clip ``CLIP``/``CustomTextCLIP``; its ``visual`` module is the image
            backbone, everything else but the logit scale/bias is the text backbone.
        image_head, text_head: [B, F_i] -> [B, D] and [B, F_t] -> [B, D].
        normalize_text_backbone: L2-normalise text backbone features (sentence-transformers
            models end in a Normalize module that open_clip's HF adapter does not have).
        channels_last: feed images in channels-last memory format (about 2x faster
            for convolutional towers on CPU, identical outputs).
    """

    def __init__(
        self,
        clip: nn.Module,
        image_head: nn.Module,
        text_head: nn.Module,
        backbone_image_dim: int,
        backbone_text_dim: int,
        embed_dim: int,
        normalize_text_backbone: bool = False,
        channels_last: bool = False,
    ):
        super().__init__()
        self.clip = clip
        self.image_head = image_head
        self.text_head = text_head
        self.backbone_image_dim = backbone_image_dim
        self.backbone_text_dim = backbone_text_dim
        self.embed_dim = embed_dim
        self.normalize_text_backbone = normalize_text_backbone
        self.channels_last = channels_last
        self.image_locked = False
        self.text_locked = False
        self.norm_stats_frozen = False
        if channels_last:
            self.clip.visual.to(memory_format=torch.channels_last)

    @property
    def logit_scale(self) -> nn.Parameter:
        """log(1/temperature), a scalar parameter (init log(1/0.07) unless a CLIP checkpoint set it)."""
        return self.clip.logit_scale

    # -- which parameters belong to which tower ---------------------------------------------
    def image_tower_modules(self) -> list[nn.Module]:
        return [self.clip.visual]

    def text_tower_modules(self) -> list[nn.Module]:
        return [m for name, m in self.clip.named_children() if name != "visual"]

    def image_tower_parameters(self) -> list[nn.Parameter]:
        return list(self.clip.visual.parameters())

    def text_tower_parameters(self) -> list[nn.Parameter]:
        # A standard CLIP keeps its text transformer's parameters (token_embedding,
        # positional_embedding, text_projection ...) directly on the model.
        return [p for name, p in self.clip.named_parameters()
                if name.split(".")[0] not in ("visual", *_SHARED)]

    # -- backbones and heads -----------------------------------------------------------------
    def backbone_image(self, pixels: Tensor) -> Tensor:
        """pixels [B, 3, H, W] (normalised) -> backbone features [B, F_i]."""
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        return self.clip.encode_image(pixels)

    def backbone_text(self, tokens: Tensor) -> Tensor:
        """tokens [B, L] (padded token ids from the bundle's tokenizer) -> features [B, F_t]."""
        feats = self.clip.encode_text(tokens)
        return F.normalize(feats, dim=-1) if self.normalize_text_backbone else feats

    def head_image(self, feats: Tensor) -> Tensor:
        """[B, F_i] -> L2-normalised [B, D]."""
        return F.normalize(self.image_head(feats), dim=-1)

    def head_text(self, feats: Tensor) -> Tensor:
        """[B, F_t] -> L2-normalised [B, D]."""
        return F.normalize(self.text_head(feats), dim=-1)

    def encode_image(self, pixels: Tensor) -> Tensor:
        return self.head_image(self.backbone_image(pixels))

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.head_text(self.backbone_text(tokens))

    def forward(self, pixels: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        return self.encode_image(pixels), self.encode_text(tokens)

    # -- freezing ----------------------------------------------------------------------------
    def lock_image_tower(self) -> None:
        """Freeze the image backbone's parameters and its BatchNorm statistics; heads stay trainable."""
        for p in self.image_tower_parameters():
            p.requires_grad_(False)
        self.image_locked = True
        self.train(self.training)

    def lock_text_tower(self) -> None:
        """Freeze the text backbone (parameters, and dropout off); heads stay trainable."""
        for p in self.text_tower_parameters():
            p.requires_grad_(False)
        self.text_locked = True
        self.train(self.training)

    def freeze_norm_stats(self, frozen: bool = True) -> None:
        """Keep every BatchNorm's running statistics fixed (eval mode) while the rest trains.

        Fine-tuning a pretrained convolutional tower on a small, differently distributed
        dataset otherwise moves the ImageNet statistics under heads fitted to them; the
        BatchNorm scale and shift still learn.
        """
        self.norm_stats_frozen = frozen
        self.train(self.training)

    def train(self, mode: bool = True) -> "TwoTower":
        # A locked tower stays in eval mode: BatchNorm running statistics must not drift
        # and dropout must stay off, or cached backbone features would go stale. Swapping
        # in FrozenBatchNorm2d (open_clip's lock) would drop timm's fused BN+activation.
        super().train(mode)
        if self.image_locked:
            for m in self.image_tower_modules():
                m.eval()
        if self.text_locked:
            for m in self.text_tower_modules():
                m.eval()
        if self.norm_stats_frozen:
            for m in self.clip.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self
