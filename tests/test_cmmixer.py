"""CMMixer ("Video and Audio are Images"): images, mixers, MAE, retriever, loops, figure, on tiny synthetic clips."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from cmr.errors import ConfigError, DataError
from cmr.models.cmmixer import (CMMIXER_ARCHS, MIXERS, RETRIEVERS, CMMixerMAE, encode, finetune, image_as_mel,
                                image_as_video, input_kind, load_cmmixer, masked_mse, mel_as_image, patchify,
                                pretrain, random_masking, save_cmmixer, unpatchify, video_as_image)
from cmr.models.cmmixer.mae import n_masked
from cmr.models.cmmixer.vit import sincos_2d

S, T, P = 64, 4, 16  # frame side = mel bins, frames, patch: a 4 x 16 patch grid
ARCH = "cmmixer-tiny"


def clips(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth synthetic clips: frames uint8 [n, T, 3, S, S], log-mel dB [n, S, T*S] in [-80, 0]."""
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, 3, generator=g)
    ramp = torch.linspace(0, 1, S)
    frames = (z[:, None, :, None, None] * 200 + 40 * ramp[None, None, None, :, None]
              + 10 * torch.rand(n, T, 3, S, S, generator=g)).round().clamp(0, 255).to(torch.uint8)
    bands = torch.stack([ramp < 1 / 3, (ramp >= 1 / 3) & (ramp < 2 / 3), ramp >= 2 / 3], dim=0).float()
    mel = -80 + 80 * (z @ bands)[:, :, None].expand(n, S, T * S) - 5 * torch.rand(n, S, T * S, generator=g)
    return frames, mel


def images(n: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    frames, mel = clips(n, seed)
    return {"video": video_as_image(frames), "audio": mel_as_image(mel)}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- images
def test_as_images_tile_frames_left_to_right_and_invert():
    frames, mel = clips(2)
    img = video_as_image(frames)
    assert img.shape == (2, 3, S, T * S)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    for t in range(T):
        expected = (frames[:, t].float() / 255 - mean[:, None, None]) / std[:, None, None]
        torch.testing.assert_close(img[..., t * S:(t + 1) * S], expected)
    assert torch.equal(image_as_video(img, T), frames)
    mel_img = mel_as_image(mel)
    assert mel_img.shape == (2, 3, S, T * S) and torch.equal(mel_img[:, 0], mel_img[:, 2])
    torch.testing.assert_close(mel_img[:, 1], (mel + 40) / 20)
    torch.testing.assert_close(image_as_mel(mel_img), mel)


def test_as_images_reject_wrong_inputs():
    with pytest.raises(DataError, match="uint8"):
        video_as_image(torch.zeros(1, T, 3, S, S))
    with pytest.raises(DataError, match="finite"):
        mel_as_image(torch.full((1, S, S), float("-inf")))
    assert input_kind(torch.zeros(1, 1, 3, S, S, dtype=torch.uint8)) == "video"
    assert input_kind(torch.zeros(1, S, S)) == "audio"
    with pytest.raises(DataError):
        input_kind(torch.zeros(1, 3, S, S))


# ---------------------------------------------------------------- mixers
def _naive_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    mask = torch.zeros(boxes.shape[0], height, width, dtype=torch.bool)
    for b in range(boxes.shape[0]):
        for top, left, h, w in boxes[b].tolist():
            mask[b, top:top + h, left:left + w] = True
    return mask


@pytest.mark.parametrize("name,windows", [("cutmix", T), ("cutmix_clip", 1)])
def test_cutmix_box_area_matches_lambda_and_originals_are_recoverable(name, windows):
    imgs = images(6)
    directions = set()
    for seed in range(8):
        out = MIXERS.get(name)(imgs, frames=T, patch=P, generator=gen(seed))
        directions.add(out.reversed)
        assert out.boxes.shape == (6, windows, 4) and out.lam.shape == (6, windows)
        window = T * S // windows
        top, left, h, w = out.boxes.unbind(-1)
        start = torch.arange(windows) * window
        assert (top >= 0).all() and (top + h <= S).all() and (left >= start).all() and (left + w <= start + window).all()
        side = torch.sqrt(1 - out.lam)
        # each side is rounded: |h - S sqrt(1-lam)| <= 1/2, so the area is off by at most a + 1/4 pixels
        assert ((h - side * S).abs() <= 0.5).all() and ((w - side * window).abs() <= 0.5).all()
        exact = (1 - out.lam) * S * window
        assert ((h * w - exact).abs() <= side * (S + window) / 2 + 0.25).all()
        assert torch.equal(out.mask, _naive_mask(out.boxes, S, T * S))
        assert torch.equal(out.mask.sum((1, 2)), (h * w).sum(1))  # boxes of different windows never overlap
        base, other = (imgs["audio"], imgs["video"]) if out.reversed else (imgs["video"], imgs["audio"])
        mixed, inside = out.streams[0], out.mask[:, None].expand_as(base)
        assert torch.equal(mixed[~inside], base[~inside]) and torch.equal(mixed[inside], other[inside])
        assert out.kinds == ["mixed"] and out.targets == [("video", "audio")]
    assert directions == {False, True}  # p = 0.5 per batch: both directions within 8 batches


def test_mixup_is_convex():
    imgs = images(4)
    out = MIXERS.get("mixup")(imgs, frames=T, patch=P, generator=gen(1))
    v, a, m = imgs["video"], imgs["audio"], out.streams[0]
    assert (m >= torch.minimum(v, a) - 1e-6).all() and (m <= torch.maximum(v, a) + 1e-6).all()
    lam = out.lam[:, None, None, None]
    torch.testing.assert_close(m, lam * v + (1 - lam) * a)


def test_token_exchange_keeps_the_tokens():
    imgs = images(4)
    out = MIXERS.get("token")(imgs, frames=T, patch=P, generator=gen(2))
    v, a = patchify(imgs["video"], P), patchify(imgs["audio"], P)
    sv, sa = patchify(out.streams[0], P), patchify(out.streams[1], P)
    n = v.shape[1]
    swapped = out.token_mask
    assert torch.equal(swapped.sum(1), ((1 - out.lam) * n).round().long())
    # position by position the two streams hold the same two tokens, exchanged where token_mask says
    assert torch.equal(sv[swapped], a[swapped]) and torch.equal(sa[swapped], v[swapped])
    assert torch.equal(sv[~swapped], v[~swapped]) and torch.equal(sa[~swapped], a[~swapped])
    for b in range(4):  # the multiset of all tokens of the sample is unchanged
        before = torch.cat([v[b], a[b]]).sort(dim=0).values
        after = torch.cat([sv[b], sa[b]]).sort(dim=0).values
        assert torch.equal(before, after)


def test_mixers_are_seeded_and_cross_modal_ones_need_both_modalities():
    imgs = images(2)
    for name in MIXERS.names():
        a, b = (MIXERS.get(name)(imgs, frames=T, patch=P, generator=gen(5)) for _ in range(2))
        assert all(torch.equal(x, y) for x, y in zip(a.streams, b.streams))
        if name != "none":
            with pytest.raises(ConfigError, match="none"):
                MIXERS.get(name)({"video": imgs["video"]}, frames=T, patch=P, generator=gen())


# ---------------------------------------------------------------- MAE pieces
def test_patchify_round_trip_on_a_non_square_grid():
    x = torch.randn(2, 3, 4 * P, 16 * P)
    patches = patchify(x, P)
    assert patches.shape == (2, 64, P * P * 3)
    for i, j in [(0, 0), (1, 5), (3, 15), (2, 9)]:  # patch (row i, column j) is row-major token i * 16 + j
        naive = x[:, :, i * P:(i + 1) * P, j * P:(j + 1) * P].permute(0, 2, 3, 1).reshape(2, -1)
        assert torch.equal(patches[:, i * 16 + j], naive)
    assert torch.equal(unpatchify(patches, (4, 16), P), x)


def test_sincos_positions_on_a_non_square_grid():
    pos = sincos_2d(4, 16, 32)
    assert pos.shape == (64, 32) and len(torch.unique(pos, dim=0)) == 64
    # first half encodes the row, second half the column
    assert torch.equal(pos[0, :16], pos[15, :16]) and torch.equal(pos[0, 16:], pos[16, 16:])


@pytest.mark.parametrize("n,ratio", [(64, 0.75), (10, 0.75), (7, 0.5), (128, 0.9), (3, 0.5)])
def test_exactly_the_mask_ratio_is_masked(n, ratio):
    ids_keep, mask = random_masking(5, n, ratio, gen(3))
    k = int(math.floor(ratio * n + 0.5))
    assert n_masked(n, ratio) == k
    assert torch.equal(mask.sum(1), torch.full((5,), k))
    assert ids_keep.shape == (5, n - k) and not mask.gather(1, ids_keep).any()
    with pytest.raises(ConfigError, match="mask_ratio"):
        random_masking(1, n, 0.0, gen())


def test_loss_counts_masked_patches_only():
    target = torch.zeros(1, 4, 3)
    pred = torch.zeros(1, 4, 3)
    mask = torch.tensor([[True, False, True, False]])
    assert masked_mse(pred, target, mask) == 0
    pred[0, 1] = 5.0  # a visible patch: the loss does not move
    assert masked_mse(pred, target, mask) == 0
    pred[0, 2, 0] = 3.0  # one pixel of a masked patch: 3^2 / 3 pixels / 2 masked patches
    assert masked_mse(pred, target, mask).item() == pytest.approx(9 / 3 / 2)


def test_mae_loss_equals_a_naive_masked_mse_of_its_predictions():
    torch.manual_seed(0)
    model = CMMixerMAE(ARCH, norm_pix_loss=True)
    imgs = images(2)
    with torch.no_grad():
        out = model(MIXERS.get("cutmix")(imgs, frames=T, patch=P, generator=gen()), imgs, 0.75, gen())
    for m, pred in out.pred.items():
        assert torch.equal(out.masks[m].sum(1), torch.full((2,), 48))
        raw = patchify(imgs[m], P)
        target = (raw - raw.mean(-1, keepdim=True)) / (raw.var(-1, keepdim=True) + 1e-6).sqrt()
        naive = sum(((pred[b, i] - target[b, i]) ** 2).mean() for b in range(2) for i in range(64)
                    if out.masks[m][b, i]) / 96
        assert out.parts[f"loss/{m}"] == pytest.approx(naive.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(sum(out.parts.values()) / 2, rel=1e-6)


@pytest.mark.parametrize("name", MIXERS.names())
def test_every_mixer_runs_forward_and_backward_through_the_mae(name):
    torch.manual_seed(0)
    model = CMMixerMAE(ARCH)
    imgs = images(2)
    mix = MIXERS.get(name)(imgs, frames=T, patch=P, generator=gen())
    out = model(mix, imgs, 0.75, gen())
    assert torch.isfinite(out.loss) and set(out.pred) == {"video", "audio"}
    assert all(p.shape == (2, 64, P * P * 3) for p in out.pred.values())
    out.loss.backward()
    for param in (model.encoder.patch_embed.weight, model.heads["video"].weight, model.heads["audio"].weight,
                  model.mask_token):
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0
    recon = model.reconstruct(out, imgs)
    for m in ("video", "audio"):
        visible = ~out.masks[m]
        assert torch.equal(patchify(recon[m], P)[visible], patchify(imgs[m], P)[visible])


def test_archs_are_data():
    assert {"cmmixer-tiny", "cmmixer-small", "cmmixer-base"} <= set(CMMIXER_ARCHS.names())
    tiny, base = CMMIXER_ARCHS.get("cmmixer-tiny"), CMMIXER_ARCHS.get("cmmixer-base")
    assert (tiny.dim, tiny.depth, tiny.heads, tiny.decoder_dim, tiny.decoder_depth, tiny.patch_size) == \
        (128, 4, 4, 64, 2, 16)
    assert (base.dim, base.depth, base.heads) == (768, 12, 12)


# ---------------------------------------------------------------- loops, retriever, checkpoint, figure
def test_pretrain_lowers_the_validation_loss_and_restores_the_best_epoch():
    video, audio = clips(16, seed=1)
    val_video, val_audio = clips(8, seed=2)
    lines = []
    model, result = pretrain(video, audio, val_video, val_audio, arch=ARCH, mixer="cutmix", mask_ratio=0.75,
                             epochs=2, batch_size=8, lr=2e-3, weight_decay=0.05, seed=0, log=lines.append)
    assert len(result.history) == 2 and result.best_epoch >= 1  # an epoch beat the untrained state
    epoch0 = float(lines[0].split("=")[-1])
    best = result.history[result.best_epoch - 1]
    assert best["val/loss"] < -epoch0 and {"train/loss", "val/loss/video", "val/loss/audio"} <= set(best)
    assert result.best["loss"] == best["val/loss"] and any("clips/s" in line for line in lines)


def test_pretrain_on_one_modality_alone():
    video, audio = clips(8)
    _, result = pretrain(None, audio, None, audio, arch=ARCH, mixer="none", epochs=1, batch_size=4, lr=1e-3,
                         weight_decay=0.0, seed=0, log=lambda _: None, modalities=("audio",))
    assert set(result.best) >= {"loss", "loss/audio"} and "loss/video" not in result.best
    with pytest.raises(ConfigError, match="none"):
        pretrain(video, None, video, None, arch=ARCH, mixer="cutmix", epochs=1, batch_size=4, lr=1e-3,
                 weight_decay=0.0, seed=0, log=lambda _: None, modalities=("video",))


def still_pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable still-image <-> mel pairs: colour (r, g, b) of the image = loudness of three mel bands."""
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, 3, generator=g)
    image = (z[:, None, :, None, None] * 255).expand(n, 1, 3, S, S).round().to(torch.uint8)
    third = S // 3
    mel = torch.full((n, S, S), -80.0)
    for k in range(3):
        mel[:, k * third:(k + 1) * third] = (-80 + 80 * z[:, k])[:, None, None]
    return image, mel


def test_finetune_from_random_init_retrieves_separable_pairs():
    train_a, train_b = still_pairs(64, seed=0)
    val_a, val_b = still_pairs(32, seed=1)
    lines = []
    model, result = finetune(None, train_a, train_b, val_a, val_b, arch=ARCH, retriever="two_tower",
                             embed_dim=32, pool="mean", epochs=4, batch_size=32, lr=1e-3, weight_decay=0.0,
                             seed=0, log=lines.append)
    emb_a, emb_b = encode(model, val_a, val_b, batch_size=16)
    assert emb_a.shape == (32, 32) and torch.allclose(emb_a.norm(dim=1), torch.ones(32), atol=1e-5)
    # random ranking gives R@1 = 1/32 (3 %) and R@10 = 31 %
    assert result.best["t2i/R@1"] > 0.25 and result.best["i2t/R@1"] > 0.25, lines
    assert result.best_epoch >= 1


def test_finetune_with_class_labels_and_a_shared_encoder():
    train_a, train_b = still_pairs(16, seed=0)
    labels = torch.arange(16) % 4
    model, result = finetune(None, train_a, train_b, train_a, train_b, arch=ARCH, retriever="shared",
                             embed_dim=16, epochs=1, batch_size=8, lr=1e-3, weight_decay=0.0, seed=0,
                             log=lambda _: None, labels=labels, val_labels=labels, level="class",
                             select_metric="val/mAP")
    assert len(model.encoders) == 1 and 0 <= result.best["mAP"] <= 1


def test_two_towers_start_from_the_encoder_as_separate_copies():
    mae = CMMixerMAE(ARCH)
    state = mae.encoder.state_dict()
    model = RETRIEVERS.get("two_tower")(ARCH, embed_dim=16, kinds=("video", "audio"), encoder_state=state)
    for side in ("a", "b"):
        enc = model.encoder(side).state_dict()
        assert all(torch.equal(enc[k], state[k]) for k in state)
    with torch.no_grad():
        model.encoder("a").cls_token.add_(1.0)
    assert not torch.equal(model.encoder("a").cls_token, model.encoder("b").cls_token)
    with pytest.raises(DataError, match="side a"):
        model(torch.zeros(2, S, T * S), "a")


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    video, mel = clips(2)
    retriever = RETRIEVERS.get("shared")(ARCH, embed_dim=16, kinds=("video", "audio"), pool="mean")
    save_cmmixer(retriever, tmp_path / "ret", settings={"epochs": 3})
    loaded, spec = load_cmmixer(tmp_path / "ret")
    assert spec["retriever"] == "shared" and spec["settings"] == {"epochs": 3}
    torch.testing.assert_close(encode(loaded, video, mel), encode(retriever, video, mel))
    # an unregistered architecture loads too: the spec carries the whole of it
    micro = replace(CMMIXER_ARCHS.get(ARCH), name="micro", dim=32, depth=1, heads=2, decoder_dim=32,
                    decoder_depth=1, decoder_heads=2)
    mae = CMMixerMAE(micro, norm_pix_loss=True)
    save_cmmixer(mae, tmp_path / "mae")
    loaded_mae, spec = load_cmmixer(tmp_path / "mae")
    assert spec["norm_pix_loss"] is True and loaded_mae.arch == micro
    assert all(torch.equal(v, loaded_mae.state_dict()[k]) for k, v in mae.state_dict().items())
    with pytest.raises(ConfigError, match="not found"):
        (tmp_path / "mae" / "model.safetensors").unlink()
        load_cmmixer(tmp_path / "mae")


@pytest.mark.parametrize("mixer", ["cutmix", "none"])
def test_reconstruction_figure_renders(tmp_path, mixer):
    from cmr.models.cmmixer.figures import COLUMNS, reconstruction_figure

    torch.manual_seed(0)
    video, mel = clips(3)
    fig = reconstruction_figure(CMMixerMAE(ARCH), video, mel, mixer=mixer, n_examples=3)
    assert len(fig.axes) == 3 * len(COLUMNS)
    fig.savefig(tmp_path / f"{mixer}.png", dpi=60)
    assert (tmp_path / f"{mixer}.png").stat().st_size > 5_000
