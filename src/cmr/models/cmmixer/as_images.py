""""Video and audio are images": a clip's T frames, and its log-mel cut into T windows, tiled side by side.

A clip of T frames of S x S pixels becomes one wide image [3, S, T*S] (frame t in columns
[t*S, (t+1)*S)); its log-mel spectrogram [M, T*S] (M mel bins, T*S time steps, so window t
lies under frame t) becomes a 3-channel image [3, M, T*S]. With M == S both images share
one patch grid, which is what the cross-modal mixers need.

Normalisations (fixed, no dataset statistics):

* video: pixels / 255, then ImageNet mean/std per channel (MAE's and ViT's convention);
* mel:   (dB - (-40)) / 20, the same value in all three channels. Log-mels in dB relative to
  the clip's maximum (``power_to_db(ref=max, top_db=80)``) lie in [-80, 0], which this maps
  to [-2, 2], about the spread of the normalised video. Nothing is clipped, so the inverse
  is exact.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cmr.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DB_CENTER = -40.0  # dB at the middle of an 80 dB range below the maximum
DB_SCALE = 20.0  # dB per unit: [-80, 0] dB -> [-2, 2]


def _stats(like: Tensor) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, device=like.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=like.device, dtype=torch.float32).view(1, 3, 1, 1)
    return mean, std


def check_frames(frames: Tensor, where: str = "video") -> None:
    """DataError unless ``frames`` is uint8 [B, T, 3, S, S]."""
    if frames.dtype != torch.uint8 or frames.dim() != 5 or frames.shape[2] != 3 or frames.shape[3] != frames.shape[4]:
        raise DataError(where, "frames are uint8 [B, T, 3, S, S]",
                        f"got {frames.dtype} {tuple(frames.shape)}")


def check_mel(mel: Tensor, where: str = "audio") -> None:
    """DataError unless ``mel`` is a floating [B, M, L] tensor of finite dB values."""
    if not mel.is_floating_point() or mel.dim() != 3:
        raise DataError(where, "log-mel is float [B, M, T*S] in dB", f"got {mel.dtype} {tuple(mel.shape)}")
    if not torch.isfinite(mel).all():
        raise DataError(where, "log-mel values are finite", "found NaN or inf (log of zero power?)")


def video_as_image(frames: Tensor) -> Tensor:
    """uint8 [B, T, 3, S, S] -> float32 [B, 3, S, T*S], frames left to right, ImageNet-normalised."""
    check_frames(frames)
    b, t, c, s, _ = frames.shape
    wide = frames.permute(0, 2, 3, 1, 4).reshape(b, c, s, t * s).float().div_(255.0)
    mean, std = _stats(wide)
    return (wide - mean) / std


def mel_as_image(mel: Tensor) -> Tensor:
    """float [B, M, T*S] dB -> float32 [B, 3, M, T*S]: (dB - DB_CENTER) / DB_SCALE in each channel."""
    check_mel(mel)
    x = (mel.float() - DB_CENTER) / DB_SCALE
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


def image_as_video(image: Tensor, frames: int) -> Tensor:
    """Inverse of :func:`video_as_image`: [B, 3, S, T*S] -> uint8 [B, T, 3, S, S] (rounded, clipped)."""
    b, c, s, width = image.shape
    if width != frames * s:
        raise ValueError(f"image width {width} is not frames ({frames}) x height ({s})")
    mean, std = _stats(image)
    pixels = ((image.float() * std + mean) * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    return pixels.reshape(b, c, s, frames, s).permute(0, 3, 1, 2, 4).contiguous()


def image_as_mel(image: Tensor) -> Tensor:
    """Inverse of :func:`mel_as_image`: [B, 3, M, L] -> dB [B, M, L] (mean of the three channels)."""
    return image.float().mean(dim=1) * DB_SCALE + DB_CENTER


def display_rgb(image: Tensor) -> Tensor:
    """[B, 3, H, W] in video normalisation -> [B, H, W, 3] in [0, 1] for imshow.

    Also used for mixed images: mel pixels in [-2, 2] land inside [0, 1] roughly, so both
    modalities stay visible side by side.
    """
    mean, std = _stats(image)
    return (image.float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1)
