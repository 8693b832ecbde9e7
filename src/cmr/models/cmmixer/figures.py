"""One figure per pre-training run: what the MAE saw and what it made of it.

Rows are examples; columns are the original video image, the original mel, the mixed
input (first stream), that input with its masked patches greyed out, and the
reconstructed video and mel (predicted pixels on masked patches, original pixels on
visible ones). The caller decides where the figure goes (a PNG, an MLflow artifact).
"""
from __future__ import annotations

import torch
# a bare Figure, not pyplot: no global figure list to leak into, no backend switched, no window
from matplotlib.figure import Figure
from torch import Tensor

from cmr.models.cmmixer.as_images import display_rgb, image_as_mel, mel_as_image, video_as_image
from cmr.models.cmmixer.mae import CMMixerMAE
from cmr.models.cmmixer.mixers import MIXERS, patch_mask_to_pixels

MASK_GREY = 0.5
COLUMNS = ("video", "mel", "encoder input", "masked", "reconstructed video", "reconstructed mel")


def _show(ax, picture: Tensor | None, is_mel: bool) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if picture is None:
        ax.set_facecolor("0.9")
    elif is_mel:
        ax.imshow(picture.numpy(), origin="lower", aspect="auto", cmap="magma", vmin=-80, vmax=0)
    else:
        ax.imshow(picture.numpy(), aspect="auto")


@torch.no_grad()
def reconstruction_figure(model: CMMixerMAE, video: Tensor | None, audio: Tensor | None, *, mixer: str,
                          mask_ratio: float = 0.75, seed: int = 0, n_examples: int = 4,
                          title: str | None = None) -> Figure:
    """video: uint8 [N, T, 3, S, S] or None; audio: float [N, S, T*S] dB or None (one-modality MAE).

    Draws the first ``n_examples`` clips with masks and mixes from ``seed``; returns the Figure.
    """
    images = {}
    if video is not None:
        images["video"] = video_as_image(video[:n_examples])
    if audio is not None:
        images["audio"] = mel_as_image(audio[:n_examples])
    device = next(model.parameters()).device
    images = {m: x.to(device) for m, x in images.items()}
    frames = video.shape[1] if video is not None else max(1, audio.shape[2] // audio.shape[1])
    gen = torch.Generator().manual_seed(seed)
    mix = MIXERS.get(mixer)(images, frames=frames, patch=model.arch.patch_size, generator=gen)
    model.eval()
    out = model(mix, images, mask_ratio, gen)
    recon = {m: x.cpu() for m, x in model.reconstruct(out, images).items()}
    images = {m: x.cpu() for m, x in images.items()}
    first = mix.streams[0].cpu()
    hidden = patch_mask_to_pixels(out.masks[mix.targets[0][0]].cpu(), out.grid, model.arch.patch_size)
    masked = display_rgb(first).masked_fill(hidden[..., None], MASK_GREY)
    as_mel = lambda m, source: image_as_mel(source[m]) if m in source else None  # noqa: E731
    as_rgb = lambda m, source: display_rgb(source[m]) if m in source else None  # noqa: E731
    columns = [(as_rgb("video", images), False), (as_mel("audio", images), True), (display_rgb(first), False),
               (masked, False), (as_rgb("video", recon), False), (as_mel("audio", recon), True)]
    rows = first.shape[0]
    height, width = first.shape[-2:]
    fig = Figure(figsize=(len(COLUMNS) * 2.2 * width / max(width, height) + 0.5, rows * 1.0 + 0.8))
    axes = fig.subplots(rows, len(COLUMNS), squeeze=False)
    for r in range(rows):
        for c, (pictures, is_mel) in enumerate(columns):
            _show(axes[r, c], None if pictures is None else pictures[r], is_mel)
    for c, name in enumerate(COLUMNS):
        axes[0, c].set_title(name, fontsize=9)
    fig.suptitle(title or f"mixer {mixer}, mask ratio {mask_ratio:g}", fontsize=10)
    fig.tight_layout()
    return fig
