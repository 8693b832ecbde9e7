"""Pre-training (mixed MAE) and fine-tuning (contrastive retriever), with selection on validation.

Pure functions with explicit arguments. Inputs are whole tensors in memory: frames uint8
[N, T, 3, S, S] and log-mels float [N, M, T*S] in dB; batches are turned into images
(:mod:`.as_images`) on the fly, so the uint8 frames stay small.

Both loops reuse the engine's epoch selection (:func:`cmr.training.engine._select`): every
epoch is scored on validation and the best state is restored at the end. The engine keeps
the HIGHER score, so pre-training is selected on ``val/neg_loss`` = - validation
reconstruction loss; validation masks and mixes come from a generator reseeded at each
evaluation, so every epoch is scored on the same masked inputs.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from cmr.errors import ConfigError, DataError
from cmr.losses.base import same_key, share_label
from cmr.losses.pairwise import multi_positive_nce
from cmr.models.cmmixer.mae import CMMixerMAE
from cmr.models.cmmixer.mixers import MIXERS, MODALITIES
from cmr.models.cmmixer.retriever import AS_IMAGE, RETRIEVERS, CMMixerRetriever, input_kind
from cmr.retrieval.evaluation import evaluate_embeddings
from cmr.training.engine import TrainResult, _cosine, _optimizer, _select, seed_everything

MAX_LOGIT_SCALE = 100.0  # CLIP's clamp: a temperature below 1/100 destabilises training


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """Shuffled index batches, ragged tail dropped (one batch of all rows when n < batch_size)."""
    order = torch.randperm(n, generator=generator)
    n_full = max(1, n // batch_size)
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(n_full)]


def _by_modality(modalities: Sequence[str], video, audio, split: str) -> dict[str, Tensor]:
    given = {"video": video, "audio": audio}
    bad = [m for m in modalities if m not in MODALITIES]
    if bad or not modalities or len(set(modalities)) != len(modalities):
        raise ConfigError(f"modalities {tuple(modalities)}: one or both of {MODALITIES}, each once")
    data = {m: given[m] for m in modalities}
    for m, x in data.items():
        if x is None:
            raise DataError(f"{split} {m}", "given for every modality in modalities", "is None")
    sizes = {m: x.shape[0] for m, x in data.items()}
    if len(set(sizes.values())) != 1:
        raise DataError(split, "video and audio have one row per clip", f"rows {sizes}")
    return data


def _frames(data: dict[str, Tensor]) -> int:
    """T: frames of the video, else mel width / mel bins."""
    if "video" in data:
        return int(data["video"].shape[1])
    mel = data["audio"]
    return max(1, int(mel.shape[2]) // int(mel.shape[1]))


def _on_device(data: dict[str, Tensor], rows: Tensor, device: str) -> dict[str, Tensor]:
    return {m: AS_IMAGE[m](x[rows].to(device)) for m, x in data.items()}


def pretrain(video: Tensor | None, audio: Tensor | None, val_video: Tensor | None, val_audio: Tensor | None, *,
             arch: str, mixer: str = "cutmix", mask_ratio: float = 0.75, epochs: int, batch_size: int, lr: float,
             weight_decay: float, seed: int, device: str = "cpu", amp: bool = True,
             log: Callable[[str], None] = print, modalities: Sequence[str] = MODALITIES,
             norm_pix_loss: bool = False) -> tuple[CMMixerMAE, TrainResult]:
    """Mixed-MAE pre-training of :class:`CMMixerMAE` (``arch``: a ``CMMIXER_ARCHS`` name).

    video/val_video: uint8 [N, T, 3, S, S]; audio/val_audio: float [N, S, T*S] dB. One modality
    in ``modalities`` = a plain MAE on it (mixer ``none``; the other inputs may be None).
    ``amp``: bfloat16 autocast on CUDA (ignored on CPU). Returns the model at the epoch of
    lowest validation reconstruction loss; history rows hold train/loss, train/loss/<m>,
    val/loss, val/loss/<m> per epoch.
    """
    train, val = _by_modality(modalities, video, audio, "train"), _by_modality(modalities, val_video, val_audio, "val")
    mix = MIXERS.get(mixer)
    if len(modalities) == 1 and mixer != "none":
        raise ConfigError(f"mixer {mixer!r} mixes two modalities; modalities={tuple(modalities)} takes 'none'")
    gen = seed_everything(seed)
    model = CMMixerMAE(arch, norm_pix_loss=norm_pix_loss).to(device)
    frames, patch, n = _frames(train), model.arch.patch_size, next(iter(train.values())).shape[0]
    steps = epochs * max(1, n // batch_size)
    opt = _optimizer(model, nn.Module(), lr, weight_decay)
    sched = _cosine(opt, steps, warmup=max(1, steps // 10))
    use_amp = amp and str(device).startswith("cuda")

    def step(data: dict[str, Tensor], rows: Tensor, generator: torch.Generator):
        images = _on_device(data, rows, device)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
            return model(mix(images, frames=frames, patch=patch, generator=generator), images, mask_ratio, generator)

    def run_epoch(epoch: int) -> dict:
        model.train()
        batches, sums, t0 = _batches(n, batch_size, gen), {}, time.perf_counter()
        for rows in batches:
            out = step(train, rows, gen)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            sched.step()
            for k, v in {"loss": float(out.loss.detach()), **out.parts}.items():
                sums[k] = sums.get(k, 0.0) + v / len(batches)
        clips = sum(len(b) for b in batches)
        log(f"epoch {epoch}: pre-training {clips / (time.perf_counter() - t0):.1f} clips/s")
        return sums

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        val_gen, n_val, sums = torch.Generator().manual_seed(seed + 1), next(iter(val.values())).shape[0], {}
        for rows in torch.arange(n_val).split(batch_size):
            out = step(val, rows, val_gen)
            for k, v in {"loss": float(out.loss), **out.parts}.items():
                sums[k] = sums.get(k, 0.0) + v * len(rows) / n_val
        return {**sums, "neg_loss": -sums["loss"]}

    return model, _select(model, nn.Module(), epochs, run_epoch, evaluate, "val/neg_loss", log, opt, sched, gen)


def label_matrix(labels: Tensor) -> Tensor:
    """[N] class ids or [N, C] multi-hot -> float [N, C] multi-hot."""
    if labels.dim() == 1:
        return torch.nn.functional.one_hot(labels.long()).float()
    if labels.dim() == 2:
        return labels.float()
    raise DataError("labels", "class ids [N] or multi-hot [N, C]", f"got shape {tuple(labels.shape)}")


@torch.no_grad()
def encode(retriever: CMMixerRetriever, a: Tensor, b: Tensor, batch_size: int = 64,
           device: str = "cpu") -> tuple[Tensor, Tensor]:
    """(emb_a [N_a, D], emb_b [N_b, D]) float32 on CPU, L2-normalised; a: gallery side, b: query side."""
    retriever.eval().to(device)
    return tuple(torch.cat([retriever(x[rows], side).cpu() for rows in torch.arange(x.shape[0]).split(batch_size)])
                 for x, side in ((a, "a"), (b, "b")))


def finetune(encoder_state: dict[str, Tensor] | None, train_a: Tensor, train_b: Tensor, val_a: Tensor,
             val_b: Tensor, *, arch: str, retriever: str = "two_tower", embed_dim: int = 128, pool: str = "cls",
             epochs: int, batch_size: int, lr: float, weight_decay: float, seed: int, device: str = "cpu",
             amp: bool = True, log: Callable[[str], None] = print, labels: Tensor | None = None,
             val_labels: Tensor | None = None, level: str = "instance", select_metric: str = "val/rsum",
             ks: Sequence[int] = (1, 5, 10)) -> tuple[CMMixerRetriever, TrainResult]:
    """Contrastive fine-tuning of a retriever (``RETRIEVERS`` name) from a pre-trained encoder.

    Row i of side a (gallery) pairs with row i of side b (queries); each side is frames or a
    mel (:func:`input_kind`). ``encoder_state``: ``CMMixerMAE.encoder.state_dict()``, or None
    for random initialisation. Loss: symmetric InfoNCE; with ``labels`` ([N] ids or [N, C]
    multi-hot) every pair sharing a class is a positive (class-level, e.g. AV-MNIST digits).
    Selection on ``select_metric`` of :func:`evaluate_embeddings` at ``level`` (``class``
    needs ``val_labels``), where t2i = b -> a and i2t = a -> b.
    """
    for split, x, y in (("train", train_a, train_b), ("val", val_a, val_b)):
        if x.shape[0] != y.shape[0]:
            raise DataError(split, "sides a and b have one row per pair", f"{x.shape[0]} vs {y.shape[0]}")
    kinds = (input_kind(train_a, "train side a"), input_kind(train_b, "train side b"))
    gen = seed_everything(seed)
    model = RETRIEVERS.get(retriever)(arch, embed_dim=embed_dim, kinds=kinds, pool=pool,
                                      encoder_state=encoder_state).to(device)
    n = train_a.shape[0]
    classes = None if labels is None else label_matrix(labels).to(device)
    val_classes = None if val_labels is None else label_matrix(val_labels)
    steps = epochs * max(1, n // batch_size)
    opt = _optimizer(model, nn.Module(), lr, weight_decay)
    sched = _cosine(opt, steps, warmup=max(1, steps // 10))
    use_amp = amp and str(device).startswith("cuda")

    def run_epoch(_epoch: int) -> dict:
        model.train()
        batches, total = _batches(n, batch_size, gen), 0.0
        for rows in batches:
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
                emb_a, emb_b = model(train_a[rows], "a"), model(train_b[rows], "b")
            rows = rows.to(device)
            positives = same_key(rows) if classes is None else same_key(rows) | share_label(classes[rows])
            loss = multi_positive_nce(model.logit_scale.exp() * emb_a.float() @ emb_b.float().t(), positives)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
            total += float(loss.detach()) / len(batches)
        return {"loss": total}

    def evaluate() -> dict:
        emb_a, emb_b = encode(model, val_a, val_b, batch_size, device)
        return evaluate_embeddings(emb_a, emb_b, torch.arange(emb_b.shape[0]), level, labels=val_classes, ks=ks)

    return model, _select(model, nn.Module(), epochs, run_epoch, evaluate, select_metric, log, opt, sched, gen)
