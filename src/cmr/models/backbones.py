"""Building the registered two-tower architectures (:mod:`cmr.models.architectures`) with open_clip.

A builder takes ``pretrained`` and returns :class:`Backbones`; :func:`build_two_tower` adds
the heads and preprocessing the same way for every architecture. Importing this module loads
open_clip, timm and transformers (seconds); the registry of names does not.
"""
from __future__ import annotations

import contextlib
import logging
import pickle
from pathlib import Path
from typing import Callable, NamedTuple

import open_clip
import torch
from torch import nn
from transformers import AutoTokenizer

from cmr.errors import ConfigError
from cmr.models.architectures import ARCHITECTURES, CONFIG_DIR, NO_WEIGHTS, resolve_arch
from cmr.models.concat_visual import ConcatVisual
from cmr.models.heads import build_head
from cmr.models.offline_weights import EFFICIENTNET_LITE, load_lite_imagenet, minilm_dir
from cmr.models.two_tower import TowerBundle, TowerSpec, TwoTower

open_clip.add_model_config(CONFIG_DIR)  # so open_clip finds configs/lite*-minilm.json by name


class Backbones(NamedTuple):
    clip: nn.Module  # open_clip CLIP / CustomTextCLIP
    tokenizer: Callable  # list[str] -> LongTensor[B, L]
    normalize_text: bool  # L2-normalise text backbone output


class PadToLongestTokenizer:
    """list[str] -> LongTensor [B, L]: HF word pieces padded to the batch's longest text.

    open_clip's HFTokenizer always pads to the context length; padding to the longest text
    gives the same mean-pooled features (padding is masked) at a fraction of the cost for
    short captions. ``context_length`` caps L (all-MiniLM-L6-v2 was trained with 256).
    """

    def __init__(self, folder: str | Path, context_length: int):
        self.hf = AutoTokenizer.from_pretrained(str(folder))
        self.context_length = context_length
        self.pad_token_id = self.hf.pad_token_id

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.hf(texts, padding="longest", truncation=True, max_length=self.context_length,
                       return_tensors="pt").input_ids


# mean/std 0.5 is the TF-Lite convention these weights (Lite0/1/2) were trained with; it also
# transferred better to photos than ImageNet statistics.
LITE0_PREPROCESS = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
                    "resize_mode": "shortest"}


@contextlib.contextmanager
def _quiet_build():
    import transformers

    old_root, old_tf = logging.getLogger().level, transformers.logging.get_verbosity()
    logging.getLogger().setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.getLogger().setLevel(old_root)
        transformers.logging.set_verbosity(old_tf)
        transformers.utils.logging.enable_progress_bar()


def lite_minilm(variant: str, pretrained: str) -> Backbones:
    """EfficientNet-Lite ``variant`` (ImageNet, timm) + all-MiniLM-L6-v2, from installed packages."""
    name = f"{variant}-minilm"
    if pretrained not in ("offline", NO_WEIGHTS):
        raise ConfigError(f"model.pretrained: arch {name!r} takes 'offline' or 'none', got {pretrained!r}")
    folder = str(minilm_dir())
    cfg = open_clip.get_model_config(name)
    # The JSON names the Hub model; point open_clip at the installed copy instead.
    text_cfg = {**cfg["text_cfg"], "hf_model_name": folder, "hf_tokenizer_name": folder,
                "hf_model_pretrained": pretrained == "offline"}
    # open_clip warns "initialized partially" and transformers prints a load report for the
    # unused BERT pooler; both are expected here (the image weights are loaded just below).
    with _quiet_build():
        clip = open_clip.create_model(name, pretrained=None, pretrained_image=False, text_cfg=text_cfg,
                                      force_preprocess_cfg=LITE0_PREPROCESS)
    if pretrained == "offline":
        load_lite_imagenet(clip.visual.trunk, variant)
    tokenizer = PadToLongestTokenizer(folder, text_cfg["context_length"])
    if tokenizer.pad_token_id != clip.text.config.pad_token_id:
        raise ConfigError(f"{folder}: tokenizer pad id {tokenizer.pad_token_id} != model pad id "
                          f"{clip.text.config.pad_token_id}; padded tokens would be pooled")
    return Backbones(clip, tokenizer, normalize_text=True)


def lite_concat_minilm(variants: tuple[str, ...], pretrained: str) -> Backbones:
    """EfficientNet-Lite ``variants`` side by side (:class:`ConcatVisual`, pooled features
    concatenated in the given order) + all-MiniLM-L6-v2; the image is preprocessed at the
    largest variant's size and resized for the others."""
    largest = max(variants, key=lambda v: EFFICIENTNET_LITE[v].image_size)
    base = lite_minilm(largest, pretrained)
    towers = [base.clip.visual if v == largest else _lite_visual(v, pretrained) for v in variants]
    base.clip.visual = ConcatVisual(towers, [EFFICIENTNET_LITE[v].image_size for v in variants],
                                    base.clip.visual.preprocess_cfg)
    return base


def _lite_visual(variant: str, pretrained: str) -> nn.Module:
    """The image tower of ``<variant>-minilm`` alone (open_clip's timm wrapper, pooled, no projection)."""
    from open_clip.timm_model import TimmModel

    cfg = open_clip.get_model_config(f"{variant}-minilm")["vision_cfg"]
    visual = TimmModel(cfg["timm_model_name"], embed_dim=0, image_size=cfg["image_size"], pool=cfg["timm_pool"],
                       proj=cfg["timm_proj"], pretrained=False)
    if pretrained == "offline":
        load_lite_imagenet(visual.trunk, variant)
    return visual


def openclip_backbones(name: str, pretrained: str) -> Backbones:
    """Any open_clip architecture; its (projected) image/text features are the backbone outputs."""
    if pretrained == "offline":
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ConfigError(f"model.pretrained: open_clip arch {name!r} has no weights installed offline; give a "
                          f"checkpoint file or a tag (needs network): {', '.join(tags) or 'none known'}")
    source = None if pretrained == NO_WEIGHTS else pretrained
    if source is not None and Path(source).is_file():
        _refuse_unsafe_pickle(source)
    try:
        # open_clip reads .pt/.bin with torch.load(weights_only=True) and .safetensors with safetensors.
        clip = open_clip.create_model(name, pretrained=source, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unsafe(source, e) from None
    except RuntimeError as e:
        hint = "" if source and Path(source).is_file() else "; offline, give a local .safetensors/.pt checkpoint file"
        raise ConfigError(f"model.pretrained: cannot load {source!r} for open_clip arch {name!r}: {e}{hint}") from None
    try:
        tokenizer = open_clip.get_tokenizer(name)
    except (OSError, RuntimeError, ValueError) as e:
        raise ConfigError(f"model.arch: tokenizer for open_clip arch {name!r} unavailable offline: {e}") from None
    return Backbones(clip, tokenizer, normalize_text=False)


def _unsafe(path: str, error: Exception) -> ConfigError:
    return ConfigError(f"{path}: refused: not a plain tensor checkpoint (weights_only load failed: "
                       f"{str(error).splitlines()[0]})")


def _refuse_unsafe_pickle(path: str) -> None:
    """Refuse a pickled checkpoint holding arbitrary objects before building anything.

    With ``mmap`` only the pickle is read, not the tensor data, so this costs milliseconds.
    """
    if path.endswith(".safetensors"):
        return
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise _unsafe(path, e) from None
    except RuntimeError:
        pass  # legacy (non-zip) format cannot be mmapped; open_clip's weights_only load still guards it


@torch.no_grad()
def _feature_dims(clip: nn.Module, tokenizer: Callable, image_size: tuple[int, int]) -> tuple[int, int]:
    """Backbone output widths, measured on one blank image and one word."""
    was_training = clip.training
    clip.eval()
    image_dim = clip.encode_image(torch.zeros(1, 3, *image_size)).shape[-1]
    text_dim = clip.encode_text(tokenizer(["a"])).shape[-1]
    clip.train(was_training)
    return int(image_dim), int(text_dim)


def _square(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def build_two_tower(arch: str, pretrained: str = "offline", embed_dim: int = 256, head: str = "linear",
                    device: str = "cpu", channels_last: bool | None = None) -> TowerBundle:
    """Build a :class:`TwoTower` with its preprocessing and tokenizer.

    Args:
        arch: a name from :func:`list_architectures` (or a bare open_clip name).
        pretrained: 'offline' (installed weights), 'none', an open_clip tag, or a checkpoint file.
        embed_dim: D, the joint embedding width the heads project to.
        head: 'linear', 'mlp' or 'identity' (backbone width must equal D).
        channels_last: channels-last image memory format; default on for CPU.
    """
    name = resolve_arch(arch)
    clip, tokenizer, normalize_text = ARCHITECTURES.get(name)(pretrained)
    pp = open_clip.get_model_preprocess_cfg(clip)
    image_size = _square(pp["size"])
    image_dim, text_dim = _feature_dims(clip, tokenizer, image_size)
    model = TwoTower(
        clip,
        build_head(head, image_dim, embed_dim),
        build_head(head, text_dim, embed_dim),
        backbone_image_dim=image_dim,
        backbone_text_dim=text_dim,
        embed_dim=embed_dim,
        normalize_text_backbone=normalize_text,
        channels_last=str(device).startswith("cpu") if channels_last is None else channels_last,
    ).to(device)
    spec = TowerSpec(
        arch=name, pretrained=pretrained, embed_dim=embed_dim, head=head, image_dim=image_dim, text_dim=text_dim,
        image_size=image_size, mean=tuple(pp["mean"]), std=tuple(pp["std"]),
        interpolation=pp.get("interpolation", "bicubic"), resize_mode=pp.get("resize_mode", "shortest"),
        context_length=int(getattr(tokenizer, "context_length", 0)), normalize_text_backbone=normalize_text,
    )
    return TowerBundle(model, image_transform(spec, is_train=True), image_transform(spec, is_train=False),
                       tokenizer, spec)


def image_transform(spec: TowerSpec, is_train: bool) -> Callable:
    """PIL image -> Tensor[3, H, W], open_clip's train (random resized crop) or eval transform."""
    return open_clip.image_transform(spec.image_size, is_train=is_train, mean=spec.mean, std=spec.std,
                                     interpolation=spec.interpolation, resize_mode=spec.resize_mode)
