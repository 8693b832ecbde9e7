"""The TBPS-CLIP augmentation pool: image and text operations switchable by name, applied per item.

Image operations (``AUGMENTATIONS``, kind ``"image"``) are torchvision transforms. As in
TBPS-CLIP, the *pool* is the set of enabled operations and each image gets ``k`` of them,
drawn afresh per image. Random erasing acts on the normalised tensor, so it runs after the
model's ``preprocess``; the others act on the PIL image before it.

Text operations (kind ``"text"``) are EDA's random deletion, swap and insertion; one enabled
operation is drawn per caption. EDA's insertion adds a WordNet synonym; no WordNet is
available offline, so insertion here repeats a word already in the sentence at a random
position (it perturbs word order and length the same way, without new vocabulary).

Randomness comes only from the generator seeded at build time: the same seed and the same
sequence of calls give the same outputs, independent of torch's global RNG.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from PIL import Image
from torchvision import transforms as T

from cmr.errors import ConfigError
from cmr.registry import Registry


@dataclass(frozen=True)
class Augmentation:
    """kind: "image" (PIL -> PIL), "tensor" (normalised [3, H, W] -> same) or "text" (words, rng -> words)."""

    kind: str
    make: Callable


AUGMENTATIONS: Registry[Augmentation] = Registry("augmentation")


def _register(name: str, kind: str):
    def deco(make):
        AUGMENTATIONS.register(name)(Augmentation(kind, make))
        return make
    return deco


# -- image operations (settings of TBPS-CLIP's pool, scaled to any input size) ----------------
@_register("random_resized_crop", "image")
def _crop():
    # scale (0.5, 1): a person crop must keep most of the body for its caption to hold
    return lambda im: T.RandomResizedCrop(im.size[::-1], scale=(0.5, 1.0), antialias=True)(im)


@_register("color_jitter", "image")
def _jitter():
    return T.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1)


@_register("rotation", "image")
def _rotation():
    return T.RandomRotation(15)


@_register("grayscale", "image")
def _grayscale():
    return T.Grayscale(num_output_channels=3)


@_register("horizontal_flip", "image")
def _flip():
    # always flips once chosen: the pool already decides whether it applies
    return T.RandomHorizontalFlip(p=1.0)


@_register("random_erasing", "tensor")
def _erasing():
    return T.RandomErasing(p=1.0, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)


# -- text operations (EDA) ----------------------------------------------------------------
def _n_changes(words: Sequence[str], p: float) -> int:
    return max(1, int(round(p * len(words))))


@_register("random_deletion", "text")
def _deletion():
    def op(words: list[str], p: float, rng: random.Random) -> list[str]:
        kept = [w for w in words if rng.random() >= p]
        # never return an empty caption: keep one word, as EDA does
        return kept if kept else [rng.choice(words)]
    return op


@_register("random_swap", "text")
def _swap():
    def op(words: list[str], p: float, rng: random.Random) -> list[str]:
        out = list(words)
        if len(out) < 2:
            return out
        for _ in range(_n_changes(out, p)):
            i, j = rng.sample(range(len(out)), 2)
            out[i], out[j] = out[j], out[i]
        return out
    return op


@_register("random_insertion", "text")
def _insertion():
    def op(words: list[str], p: float, rng: random.Random) -> list[str]:
        out = list(words)
        for _ in range(_n_changes(words, p)):
            out.insert(rng.randint(0, len(out)), rng.choice(words))
        return out
    return op


def _check(names: Sequence[str], kinds: set[str]) -> list[Augmentation]:
    ops = []
    for n in names:
        try:
            aug = AUGMENTATIONS.get(n)
        except KeyError as e:
            raise ConfigError(f"augmentation: {e.args[0]}") from None
        if aug.kind not in kinds:
            raise ConfigError(f"augmentation {n!r} is a {aug.kind} operation, not one of {sorted(kinds)}")
        ops.append(aug)
    return ops


class ImageAugment:
    """PIL image -> preprocessed tensor [3, H, W] with ``k`` pool operations applied.

    Operations keep their pool order (crop before flip before erasing), so a chosen subset
    is applied in a fixed, readable order.
    """

    def __init__(self, names: Sequence[str], preprocess: Callable, k: int, seed: int):
        self.names = list(names)
        ops = _check(self.names, {"image", "tensor"})
        if not 0 <= k <= len(ops):
            raise ConfigError(f"augmentation k={k}: must be in [0, {len(ops)}] (enabled: {self.names})")
        self.ops = [(a.kind, a.make()) for a in ops]
        self.preprocess, self.k = preprocess, k
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        chosen = sorted(torch.randperm(len(self.ops), generator=self.gen)[: self.k].tolist())
        call_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.gen))
        # torchvision draws from torch's global RNG: fork it so the seed here decides alone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(call_seed)
            for i in chosen:
                if self.ops[i][0] == "image":
                    image = self.ops[i][1](image)
            x = self.preprocess(image)
            for i in chosen:
                if self.ops[i][0] == "tensor":
                    x = self.ops[i][1](x)
        return x


class TextAugment:
    """caption -> caption with one enabled EDA operation (drawn per call) at rate ``p``."""

    def __init__(self, names: Sequence[str], p: float, seed: int):
        if not 0 < p <= 1:
            raise ConfigError(f"text augmentation p={p}: must be in (0, 1]")
        self.names = list(names)
        self.ops = [a.make() for a in _check(self.names, {"text"})]
        self.p = p
        self.rng = random.Random(seed)

    def __call__(self, caption: str) -> str:
        words = caption.split()
        if not self.ops or not words:
            return caption
        return " ".join(self.rng.choice(self.ops)(words, self.p, self.rng))


def build_image_augment(names: Sequence[str], preprocess: Callable, k: int, seed: int) -> ImageAugment:
    """Augmenting transform for ``names`` (a pool of ``k``-of-n per image) composed with ``preprocess``."""
    return ImageAugment(names, preprocess, k, seed)


def build_text_augment(names: Sequence[str], p: float, seed: int) -> TextAugment:
    return TextAugment(names, p, seed)


IMAGE_POOL = tuple(n for n in AUGMENTATIONS if AUGMENTATIONS.get(n).kind != "text")
TEXT_POOL = tuple(n for n in AUGMENTATIONS if AUGMENTATIONS.get(n).kind == "text")
