"""Cross-modal mixers: how the video image and the mel image become the MAE encoder's input.

Every mixer is registered in :data:`MIXERS` and called as
``mixer(images, frames=T, patch=p, generator=g) -> MixOutput`` where ``images`` maps
``"video"`` and/or ``"audio"`` to [B, 3, H, W] images (:mod:`.as_images`; W = T * H).
All randomness comes from ``generator`` (a CPU ``torch.Generator``), so a seed fixes the mix.

* ``cutmix``: CutMix (Yun et al. 2019) across modalities, one box per frame window. For
  each clip and frame t, lambda ~ Beta(1, 1) is the fraction of the window kept; a box of
  area (1 - lambda) of the window, at the same place in both images, is pasted from the
  other modality. The base is the video image; with probability 0.5 per batch the
  direction is reversed (mel base, video pasted in). This is the cross-modal mixer of
  "Video and Audio are Images" (KBS 2024) as its authors meant it.
* ``cutmix_clip``: the same with one box per clip over the whole wide image.
* ``mixup``: convex pixel mix lambda * video + (1 - lambda) * mel, lambda ~ Beta(1, 1) per clip.
* ``token``: a random fraction (1 - lambda) of patch positions is exchanged between the two
  images; both images go on to the encoder, so the tokens as a whole are unchanged.
* ``none``: no mixing; each modality is its own stream (CAV-MAE-like "fuse without mixing").
  With one modality only, this is a plain MAE on that modality.

Beta(1, 1) is the uniform distribution; it is drawn as such so the generator fixes it.
Boxes are kept whole inside their window (the position is drawn among the places where the
box fits), so the pasted area equals 1 - lambda up to the rounding of the box sides.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from cmr.errors import ConfigError, DataError
from cmr.registry import Registry

MODALITIES = ("video", "audio")


@dataclass
class MixOutput:
    """What a mixer hands the MAE, and what it takes to inspect or undo the mix.

    streams:    encoder inputs, each [B, 3, H, W]; their tokens form one sequence
    kinds:      per stream "video", "audio" or "mixed" (selects the modality embedding)
    targets:    per stream, the modalities its tokens reconstruct (the ORIGINAL, unmixed images)
    mask:       bool [B, H, W]: pixels taken from the other image (cutmix*, token), else None
    boxes:      long [B, K, 4] (top, left, height, width) in image pixels, K = T (cutmix) or 1
    lam:        [B, K] (cutmix*) or [B] (mixup, token): drawn fraction of the base kept
    reversed:   True when the mel image is the base and video is pasted into it
    token_mask: bool [B, N] patch positions exchanged (token), row-major over the patch grid
    """

    streams: list[Tensor]
    kinds: list[str]
    targets: list[tuple[str, ...]]
    mask: Tensor | None = None
    boxes: Tensor | None = None
    lam: Tensor | None = None
    reversed: bool = False
    token_mask: Tensor | None = None


Mixer = Callable[..., MixOutput]
MIXERS: Registry[Mixer] = Registry("mixer")


def _pair(images: dict[str, Tensor], name: str) -> tuple[Tensor, Tensor]:
    missing = [m for m in MODALITIES if m not in images]
    if missing:
        raise ConfigError(f"mixer {name!r} mixes video and audio; {', '.join(missing)} missing "
                          "(a single-modality MAE takes mixer 'none')")
    video, audio = images["video"], images["audio"]
    if video.shape != audio.shape:
        raise DataError(f"mixer {name!r}", "video and mel images have one shape (mel bins == frame size)",
                        f"video {tuple(video.shape)}, audio {tuple(audio.shape)}")
    return video, audio


def _uniform(shape, generator: torch.Generator) -> Tensor:
    return torch.rand(shape, generator=generator)


def draw_boxes(lam: Tensor, height: int, width: int, generator: torch.Generator) -> Tensor:
    """long [..., 4] (top, left, h, w): boxes of area ~(1 - lam) * height * width inside a height x width window.

    The sides scale by sqrt(1 - lam) (CutMix's rule) and are rounded; the corner is uniform
    over the positions where the whole box fits.
    """
    side = (1.0 - lam).clamp(0, 1).sqrt()
    h, w = (side * height).round().long(), (side * width).round().long()
    top = (_uniform(lam.shape, generator) * (height - h + 1)).floor().long().clamp_max(height - h)
    left = (_uniform(lam.shape, generator) * (width - w + 1)).floor().long().clamp_max(width - w)
    return torch.stack([top, left, h, w], dim=-1)


def box_mask(boxes: Tensor, height: int, width: int) -> Tensor:
    """long [B, K, 4] boxes -> bool [B, height, width], True inside any of a row's boxes."""
    rows = torch.arange(height)[None, None, :, None]
    cols = torch.arange(width)[None, None, None, :]
    top, left, h, w = (boxes[..., i, None, None] for i in range(4))
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    return inside.any(dim=1)


def _paste(video: Tensor, audio: Tensor, mask: Tensor, generator: torch.Generator) -> tuple[Tensor, bool]:
    """Video base with audio inside ``mask``, or (p = 0.5, once per batch) the reverse."""
    reverse = bool(_uniform((), generator) < 0.5)
    base, other = (audio, video) if reverse else (video, audio)
    return torch.where(mask[:, None].to(base.device), other, base), reverse


def _mixed(mixed: Tensor, **info) -> MixOutput:
    return MixOutput([mixed], ["mixed"], [MODALITIES], **info)


def _cutmix(images: dict[str, Tensor], name: str, windows: int, generator: torch.Generator) -> MixOutput:
    """One box per window of width W / ``windows``, lambda ~ Beta(1, 1) per clip and window."""
    video, audio = _pair(images, name)
    b, _, height, width = video.shape
    window = width // windows
    lam = _uniform((b, windows), generator)
    boxes = draw_boxes(lam, height, window, generator)
    boxes[..., 1] += torch.arange(windows) * window  # window t starts at column t * window
    mask = box_mask(boxes, height, width)
    mixed, reverse = _paste(video, audio, mask, generator)
    return _mixed(mixed, mask=mask, boxes=boxes, lam=lam, reversed=reverse)


@MIXERS.register("cutmix")
def cutmix(images: dict[str, Tensor], *, frames: int, patch: int, generator: torch.Generator) -> MixOutput:
    """One box per frame window."""
    return _cutmix(images, "cutmix", frames, generator)


@MIXERS.register("cutmix_clip")
def cutmix_clip(images: dict[str, Tensor], *, frames: int, patch: int, generator: torch.Generator) -> MixOutput:
    """One box per clip over the whole wide image (same aspect as the image)."""
    return _cutmix(images, "cutmix_clip", 1, generator)


@MIXERS.register("mixup")
def mixup(images: dict[str, Tensor], *, frames: int, patch: int, generator: torch.Generator) -> MixOutput:
    """lambda * video + (1 - lambda) * mel, lambda ~ Beta(1, 1) per clip."""
    video, audio = _pair(images, "mixup")
    lam = _uniform((video.shape[0],), generator)
    weight = lam.to(video.device, video.dtype)[:, None, None, None]
    return _mixed(weight * video + (1 - weight) * audio, lam=lam)


def patch_mask_to_pixels(token_mask: Tensor, grid: tuple[int, int], patch: int) -> Tensor:
    """bool [B, h*w] over the patch grid -> bool [B, h*patch, w*patch]."""
    grid_mask = token_mask.reshape(-1, *grid)
    return grid_mask.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)


@MIXERS.register("token")
def token(images: dict[str, Tensor], *, frames: int, patch: int, generator: torch.Generator) -> MixOutput:
    """Exchange a fraction (1 - lambda) of patch positions between the two images, lambda ~ Beta(1, 1)."""
    video, audio = _pair(images, "token")
    b, _, height, width = video.shape
    grid = (height // patch, width // patch)
    n = grid[0] * grid[1]
    lam = _uniform((b,), generator)
    n_swap = ((1.0 - lam) * n).round().long()
    rank = torch.argsort(torch.argsort(_uniform((b, n), generator), dim=1), dim=1)
    token_mask = rank < n_swap[:, None]
    mask = patch_mask_to_pixels(token_mask, grid, patch).to(video.device)
    swapped_video = torch.where(mask[:, None], audio, video)
    swapped_audio = torch.where(mask[:, None], video, audio)
    return MixOutput([swapped_video, swapped_audio], ["video", "audio"], [("video",), ("audio",)],
                     mask=mask, lam=lam, token_mask=token_mask)


@MIXERS.register("none")
def no_mix(images: dict[str, Tensor], *, frames: int, patch: int, generator: torch.Generator) -> MixOutput:
    """Each given modality is its own stream and reconstructs itself."""
    present = [m for m in MODALITIES if m in images]
    if not present:
        raise ConfigError(f"mixer 'none': no modality given; expected keys among {MODALITIES}")
    return MixOutput([images[m] for m in present], present, [(m,) for m in present])
