"""The pipeline's training and encoding for ``cmmixer-*`` architectures ("video and audio are images").

The counterpart of :mod:`cmr.training.fit` for the two-tower models, over the same prepared items:

* :func:`fit_mae` (pretrain stage): the fuse-then-separate masked autoencoder on the pairs of the
  train split, the epoch chosen by the validation reconstruction loss;
* :func:`fit_retriever` (finetune stage): the retriever initialised from that encoder, InfoNCE (or
  class-level positives), the epoch chosen by a validation retrieval metric;
* :func:`encode_av` (encode stage): the hand-off embeddings, gallery side in ``image`` and query
  side in ``text`` (one query per item), so calibrate/index/evaluate run unchanged.

Media are decoded once per split and cached by content hash (:func:`cmr.data.media.cached_media`).
The cmmixer needs one side as frames (``video``, or an ``image`` as a still clip) and the other as
a log-mel (``audio``): the pair decides which mixer stream is which.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from cmr.data.media import MediaSpec, cached_media
from cmr.data.prepare import Prepared
from cmr.data.schema import Item, by_split
from cmr.errors import ConfigError, DataError
from cmr.io import atomic_path, write_json
from cmr.models.cmmixer import encode, finetune, load_cmmixer, pretrain, save_cmmixer
from cmr.training.features import identity_vector, label_matrix

TRAINING_FILE = "training.json"
#: the mixer streams: which item modality feeds the frames stream and which the mel stream
FRAME_MODALITIES, MEL_MODALITIES = ("video", "image"), ("audio",)


def streams(gallery: str, query: str) -> dict[str, str]:
    """``{"video": <item modality as frames>, "audio": <item modality as mel>}`` for a pair."""
    frames = [m for m in (gallery, query) if m in FRAME_MODALITIES]
    mels = [m for m in (gallery, query) if m in MEL_MODALITIES]
    if len(frames) != 1 or len(mels) != 1:
        raise ConfigError(f"data.gallery {gallery!r} / data.query {query!r}: a cmmixer architecture pairs one of "
                          f"{FRAME_MODALITIES} (frames) with {MEL_MODALITIES[0]!r} (a log-mel image)")
    return {"video": frames[0], "audio": mels[0]}


def pair_items(prepared: Prepared, split: str, gallery: str, query: str) -> list[Item]:
    """The items of ``split`` that carry both modalities of the pair (others cannot be a pair)."""
    return [it for it in by_split(prepared.items, split) if getattr(it, gallery) and getattr(it, query)]


def split_media(prepared: Prepared, items: Sequence[Item], modality: str, spec: MediaSpec,
                cache_dir: str | None, workers: int = 0) -> torch.Tensor:
    """Decoded ``modality`` of ``items``: frames uint8 [N, T, 3, S, S] or log-mel float [N, M, T*S]."""
    if not items:
        raise DataError(str(prepared.root), f"items with {modality} in this split", "none")
    return cached_media(cache_dir, prepared.root, [getattr(it, modality) for it in items], modality, spec,
                        workers=workers)


def fit_mae(prepared: Prepared, out_dir: str, *, arch: str, gallery: str, query: str, spec: MediaSpec,
            mixer: str, mask_ratio: float, norm_pix_loss: bool, pretrain_on: str, epochs: int, batch_size: int,
            lr: float, weight_decay: float, seed: int, device: str, amp: bool, cache_dir: str | None,
            log: Callable[[str], None], workers: int = 0, figure: bool = True) -> dict:
    """Pre-train the cmmixer MAE and save it to ``out_dir`` (``model/``, history, metrics, figure).

    ``pretrain_on``: ``both`` (mixer over the two streams, fuse-then-separate), ``gallery`` or
    ``query`` (a plain MAE on that modality alone; mixer must be ``none``).
    """
    which = streams(gallery, query)
    use = {"both": ("video", "audio"), "gallery": (_stream_of(which, gallery),),
           "query": (_stream_of(which, query),)}[pretrain_on]
    data = {s: {m: split_media(prepared, pair_items(prepared, s, gallery, query), which[m], spec, cache_dir, workers)
                if m in use else None for m in ("video", "audio")} for s in ("train", "val")}
    torch.manual_seed(seed)
    model, result = pretrain(data["train"]["video"], data["train"]["audio"], data["val"]["video"],
                             data["val"]["audio"], arch=arch, mixer=mixer if len(use) == 2 else "none",
                             mask_ratio=mask_ratio, epochs=epochs, batch_size=batch_size, lr=lr,
                             weight_decay=weight_decay, seed=seed, device=device, amp=amp, log=log, modalities=use,
                             norm_pix_loss=norm_pix_loss)
    settings = {"gallery": gallery, "query": query, "streams": which, "pretrain_on": pretrain_on, "mixer": mixer,
                "mask_ratio": mask_ratio, "media": spec.to_json()}
    with atomic_path(out_dir) as tmp:
        _save(tmp, model, result, "mae", seed, prepared, settings)
        if figure:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            from cmr.models.cmmixer.figures import reconstruction_figure

            fig = reconstruction_figure(model, data["val"]["video"], data["val"]["audio"],
                                        mixer=mixer if len(use) == 2 else "none", mask_ratio=mask_ratio, seed=seed,
                                        title=f"{arch}, mixer {mixer}, mask {mask_ratio:g}: validation clips")
            fig.savefig(tmp / "reconstruction.png", dpi=110, bbox_inches="tight")
            plt.close(fig)
    return {"best_epoch": result.best_epoch, **result.best}


def truth(level: str, labels: torch.Tensor | None) -> dict:
    """``labels``/``identity`` keyword arguments of the metric functions for :func:`level_labels`' output."""
    return {"labels": labels if level == "class" else None, "identity": labels if level == "identity" else None}


def _save(tmp: Path, model, result, stage: str, seed: int, prepared: Prepared, settings: dict) -> None:
    """A stage's output folder: ``model/`` (safetensors + spec), training record, history, best metrics."""
    tmp.mkdir()
    save_cmmixer(model.cpu(), tmp / "model", settings)
    write_json(tmp / TRAINING_FILE, {"best_epoch": result.best_epoch, "seed": seed, "stage": stage,
                                     "data_version": prepared.info["data_version"], **settings})
    write_json(tmp / "history.json", result.history)
    write_json(tmp / "metrics.json", {f"val/{k}": v for k, v in result.best.items()} | {"best_epoch": result.best_epoch})


def _stream_of(which: dict[str, str], modality: str) -> str:
    return next(s for s, m in which.items() if m == modality)


def level_labels(prepared: Prepared, items: Sequence[Item], level: str) -> torch.Tensor | None:
    """What ground truth ``level`` compares: multi-hot labels (class), identity ids (identity), or None."""
    if level == "class":
        labels = label_matrix(items, prepared.label_set)
        if labels is None:
            raise ConfigError("evaluate.level 'class' needs labels; this dataset has none")
        return labels
    if level == "identity":
        ident = identity_vector(items)
        if ident is None:
            raise ConfigError("evaluate.level 'identity' needs identities; this dataset has none")
        return ident
    return None


def fit_retriever(prepared: Prepared, out_dir: str, init_dir: str, *, arch: str, gallery: str, query: str,
                  spec: MediaSpec, retriever: str, pool: str, embed_dim: int, epochs: int, batch_size: int, lr: float,
                  weight_decay: float, select_metric: str, seed: int, device: str, amp: bool, level: str,
                  ks: Sequence[int], cache_dir: str | None, log: Callable[[str], None], workers: int = 0) -> dict:
    """Fine-tune the retriever from the MAE encoder in ``init_dir/model`` and save it to ``out_dir``."""
    mae, mae_spec = load_cmmixer(Path(init_dir) / "model")
    if mae_spec.get("kind") != "mae" or mae_spec.get("arch") != arch:
        raise ConfigError(f"{Path(init_dir) / 'model'}: a {mae_spec.get('kind')} of arch {mae_spec.get('arch')!r}, "
                          f"not the {arch!r} MAE the settings ask for; rerun the pretrain stage (`dvc repro` does)")
    streams(gallery, query)  # the pair must suit the architecture
    items = {s: pair_items(prepared, s, gallery, query) for s in ("train", "val")}
    side = {s: {m: split_media(prepared, items[s], m, spec, cache_dir, workers) for m in (gallery, query)}
            for s in ("train", "val")}
    labels = {s: level_labels(prepared, items[s], level) for s in ("train", "val")}
    torch.manual_seed(seed)
    model, result = finetune(mae.encoder.state_dict(), side["train"][gallery], side["train"][query],
                             side["val"][gallery], side["val"][query], arch=arch, retriever=retriever,
                             embed_dim=embed_dim, pool=pool, epochs=epochs, batch_size=batch_size, lr=lr,
                             weight_decay=weight_decay, seed=seed, device=device, amp=amp, log=log,
                             labels=labels["train"], val_labels=labels["val"], level=level,
                             select_metric=select_metric, ks=ks)
    settings = {"gallery": gallery, "query": query, "media": spec.to_json(), "init": str(init_dir)}
    with atomic_path(out_dir) as tmp:
        _save(tmp, model, result, "retriever", seed, prepared, settings)
    return {"best_epoch": result.best_epoch, **result.best}


def encode_split(model, prepared: Prepared, items: Sequence[Item], gallery: str, query: str, spec: MediaSpec,
                 device: str, cache_dir: str | None, workers: int = 0):
    """(gallery embeddings [N, D], query embeddings [N, D]) of ``items``; row i of each is item i."""
    a = split_media(prepared, items, gallery, spec, cache_dir, workers)
    b = split_media(prepared, items, query, spec, cache_dir, workers)
    return encode(model, a, b, device=device)


def load_retriever(model_dir: str | Path, device: str = "cpu"):
    """(retriever, its settings) saved by :func:`fit_retriever` under ``model_dir/model``."""
    model, spec = load_cmmixer(Path(model_dir) / "model", device=device)
    if spec.get("kind") != "retriever":
        raise ConfigError(f"{Path(model_dir) / 'model'}: a {spec.get('kind')}, not a retriever; rerun finetune")
    return model, spec["settings"]
