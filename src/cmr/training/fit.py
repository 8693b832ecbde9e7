"""Build (or load) the two-tower model, train it on a prepared dataset, save it.

Shared by the ``pretrain`` and ``finetune`` stages; they differ only in their
settings and in where the model starts from.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Sequence

import torch

from cmr.data.prepare import Prepared
from cmr.data.schema import by_split
from cmr.errors import ConfigError
from cmr.io import check_writable, read_json, write_json
from cmr.losses import LOSSES, build_loss
from cmr.models import build_two_tower, load_two_tower, save_two_tower
from cmr.training.distributed import Distributed, is_main, local_main_first, write_on_main
from cmr.training.engine import TrainResult, train_heads, train_towers
from cmr.training.resume import Resume, fingerprint
from cmr.training.features import (FeatureSet, cache_key, cached_backbone_features, compute_backbone_features,
                                   identity_vector, label_matrix, read_cached, texts_of)

TRAINING_FILE = "training.json"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def backbone_id(model_dir: Path | None, arch: str, pretrained: str) -> str:
    """Names the backbone weights: the pretrained source, or the checkpoint once a tower was tuned."""
    if model_dir is not None:
        info = read_json(Path(model_dir) / TRAINING_FILE)
        if info.get("backbone_tuned"):
            return f"tuned:{file_digest(Path(model_dir) / 'model')}"
        return info["backbone_id"]
    return f"{arch}|{pretrained}"


def split_features(bundle, prepared: Prepared, split: str, bid: str, device: str,
                   cache_dir: str | None, workers: int = 0) -> FeatureSet:
    """Backbone features of one split, memoised by backbone and data version."""
    items = by_split(prepared.items, split)
    key = cache_key({"backbone": bid}, prepared.info["data_version"], [it.id for it in items])
    img, txt, owner = cached_backbone_features(
        cache_dir, key,
        lambda: compute_backbone_features(bundle.model, bundle.tokenizer, bundle.preprocess_val, items,
                                          prepared.root, prepared.features, device, workers=workers))
    return FeatureSet(img, txt, owner, label_matrix(items, prepared.label_set), identity_vector(items))


def live_features(bundle, prepared: Prepared, split: str, device: str, frozen: set[str],
                  cached: FeatureSet | None, workers: int = 0) -> FeatureSet:
    """Backbone features of one split from the model as it is now; a ``frozen`` tower's come from
    ``cached`` (its features cannot have changed), so an epoch re-encodes only what trains."""
    items = by_split(prepared.items, split)
    img, txt, owner = compute_backbone_features(
        bundle.model, bundle.tokenizer, bundle.preprocess_val, items, prepared.root, prepared.features, device,
        workers=workers, towers=tuple(t for t in ("image", "text") if t not in frozen))
    if "image" in frozen:
        img = cached.image
    if "text" in frozen:
        txt = cached.text
    return FeatureSet(img, txt, owner, label_matrix(items, prepared.label_set), identity_vector(items))


def model_features(bundle, prepared: Prepared, split: str, model_dir: Path, device: str, cache_dir: str | None,
                   workers: int = 0) -> FeatureSet:
    """Backbone features of one split for a saved model (``model_dir``): from the cache while its
    towers are the pretrained ones; when training tuned only some tower (``tuned_towers`` in its
    training.json), the untouched tower's features come from the pretrained backbone's cache entry
    (when there is one) and only the tuned tower runs."""
    info = read_json(Path(model_dir) / TRAINING_FILE)
    frozen = {"image", "text"} - set(info.get("tuned_towers", ("image", "text")))
    base = info.get("base_backbone_id")
    if info.get("backbone_tuned") and frozen and base:
        ids = [it.id for it in by_split(prepared.items, split)]
        hit = read_cached(cache_dir, cache_key({"backbone": base}, prepared.info["data_version"], ids))
        if hit is not None:
            return live_features(bundle, prepared, split, device, frozen, FeatureSet(*hit), workers)
    return split_features(bundle, prepared, split, backbone_id(Path(model_dir), "", ""), device, cache_dir, workers)


def split_pairs(prepared: Prepared, split: str) -> FeatureSet:
    """Who-belongs-to-what of one split (text_item, labels, identity) without backbone features:
    what tower training needs, since it encodes every batch afresh (features are [N, 0] / [T, 0])."""
    items = by_split(prepared.items, split)
    _, text_item = texts_of(items)
    return FeatureSet(torch.empty(len(items), 0), torch.empty(len(text_item), 0), text_item,
                      label_matrix(items, prepared.label_set), identity_vector(items))


def num_classes_for(prepared: Prepared, losses: dict) -> int:
    """Classes a class-wise loss sees: the label set, or the train identities for person search."""
    needs_identity = any("identity" in getattr(LOSSES.get(name), "requires", frozenset()) for name in losses)
    if needs_identity and not prepared.label_set:
        return len({it.identity for it in by_split(prepared.items, "train")})
    return len(prepared.label_set)


def fit(prepared: Prepared, out_dir: str, *, arch: str, pretrained: str, embed_dim: int, head: str,
        init_dir: str | None,
        lock_image: bool, lock_text: bool, losses: dict, loss_options: dict, epochs: int, batch_size: int,
        lr: float, weight_decay: float, select_metric: str, seed: int, device: str, amp: bool, level: str,
        ks: Sequence[int], cache_dir: str | None, log: Callable[[str], None],
        backbone_lr: float | None = None, freeze_bn_stats: bool = True, workers: int = 0,
        dist: Distributed | None = None, resume_dir: str | None = None,
        unfreeze: dict[str, int] | None = None) -> TrainResult:
    """Train from ``init_dir`` (or the pretrained towers) and save to ``out_dir``.

    ``dist`` (:func:`cmr.training.distributed.init_from_env`): one of several data-parallel
    processes; ``batch_size`` is then the global batch, rank 0 alone logs and writes ``out_dir``,
    once every rank has finished. With ``resume_dir`` (one process only), each epoch is
    checkpointed there and a rerun with the same settings, data and starting model continues
    after the last finished epoch (:mod:`cmr.training.resume`); the checkpoint is removed once
    ``out_dir`` is written. ``unfreeze`` ({'image'|'text': n}): the top n blocks of a locked tower
    train too (:meth:`TwoTower.unfreeze_top`); a tower with nothing to train keeps its cached features.
    """
    check_writable(out_dir)  # before hours of training, not after
    settings = {k: v for k, v in locals().items() if k not in ("prepared", "log", "cache_dir", "resume_dir", "dist")}
    torch.manual_seed(seed)
    if init_dir:
        bundle = load_two_tower(Path(init_dir) / "model", device=device)
        # the settings describe the model being continued: a mismatch means a stale checkpoint
        differ = [f"model.{k} {want!r} (checkpoint: {getattr(bundle.spec, k)!r})"
                  for k, want in (("arch", arch), ("pretrained", pretrained), ("embed_dim", embed_dim), ("head", head))
                  if getattr(bundle.spec, k) != want]
        if differ:
            raise ConfigError(f"{Path(init_dir) / 'model'} was trained with other model settings: {'; '.join(differ)}; "
                              "rerun the stage that writes it (`dvc repro` does)")
        bid = backbone_id(Path(init_dir), arch, pretrained)
    else:
        bundle = build_two_tower(arch, pretrained=pretrained, embed_dim=embed_dim, head=head, device=device)
        bid = backbone_id(None, arch, pretrained)
    model = bundle.model
    if lock_image:
        model.lock_image_tower()
    if lock_text:
        model.lock_text_tower()
    for tower, n in (unfreeze or {}).items():
        if not (lock_image if tower == "image" else lock_text):
            raise ConfigError(f"unfreeze.{tower}: model.lock_{tower} is false, so the whole {tower} tower "
                              "trains already; drop the unfreeze entry or lock the tower")
        model.unfreeze_top(tower, n)
    loss_fn = build_loss(losses, loss_options, model.embed_dim, num_classes_for(prepared, losses))
    resume = None
    if resume_dir is not None and dist is None:  # ranks would race on one checkpoint: no resume under torchrun
        start = file_digest(Path(init_dir) / "model") if init_dir else bid
        resume = Resume(Path(resume_dir), fingerprint(
            settings | {"data_version": prepared.info["data_version"], "start": start,
                        "torch": torch.__version__}))
    common = dict(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                  select_metric=select_metric, seed=seed, device=device, level=level, ks=ks,
                  log=log if is_main(dist) else (lambda m: None), dist=dist, resume=resume)
    frozen = {t for t in ("image", "text") if model.tower_frozen(t)}
    cached = None
    if frozen:
        with local_main_first(dist):  # one process per machine fills the feature cache
            cached = {s: split_features(bundle, prepared, s, bid, device, cache_dir, workers)
                      for s in ("train", "val")}
    if frozen == {"image", "text"}:
        result = train_heads(model, loss_fn, cached["train"], cached["val"], **common)
    else:
        def encode_val() -> FeatureSet:
            fresh = live_features(bundle, prepared, "val", device, frozen, cached and cached["val"], workers)
            model.eval()
            with torch.no_grad():
                return FeatureSet(model.head_image(fresh.image.to(device)).cpu(),
                                  model.head_text(fresh.text.to(device)).cpu(),
                                  fresh.text_item, fresh.labels, fresh.identity)

        train_fs = cached["train"] if cached else split_pairs(prepared, "train")
        result = train_towers(model, loss_fn, bundle.tokenizer, bundle.preprocess_train, encode_val,
                              by_split(prepared.items, "train"), prepared.root, train_fs, frozen=frozen,
                              amp=amp,
                              backbone_lr=backbone_lr, freeze_bn_stats=freeze_bn_stats, workers=workers,
                              **common)
    tuned = frozen != {"image", "text"} or bid.startswith("tuned:")
    # which towers differ from the pretrained ones (this run's and, continued, its start's): encode
    # reuses the pretrained cache for the others (model_features)
    init_info = read_json(Path(init_dir) / TRAINING_FILE) if init_dir else {}
    tuned_towers = {"image", "text"} - frozen
    base = bid  # the pretrained towers' id (None: unknown, no cache reuse)
    if init_info.get("backbone_tuned"):
        tuned_towers |= set(init_info.get("tuned_towers", ("image", "text")))
        base = init_info.get("base_backbone_id")

    def save(tmp: Path) -> None:
        tmp.mkdir()
        save_two_tower(model.cpu(), bundle.spec, tmp / "model")
        write_json(tmp / TRAINING_FILE, {
            "backbone_id": bid, "backbone_tuned": tuned, "tuned_towers": sorted(tuned_towers),
            "base_backbone_id": base, "best_epoch": result.best_epoch,
            "data_version": prepared.info["data_version"], "losses": losses, "seed": seed,
        })
        write_json(tmp / "history.json", result.history)
        write_json(tmp / "metrics.json", {f"val/{k}": v for k, v in result.best.items()} |
                   {"best_epoch": result.best_epoch})

    write_on_main(dist, out_dir, save)
    if resume is not None:
        resume.clear()
    return result
