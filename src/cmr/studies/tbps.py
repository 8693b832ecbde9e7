"""``cmr study tbps``: the TBPS-CLIP ablation, one run per row, identity-level text->image retrieval.

Rows add one group at a time: InfoNCE baseline -> N-ITC (identity-aware targets) -> + R-ITC
-> + SDM -> + ID loss -> + augmentation (image pool and EDA text ops). Towers are locked and
only the heads are trained on cached backbone features; augmentation enters as backbone
features of ``views`` augmented copies of every train item (images through the augmentation
pool, captions through EDA), computed once. That is cheaper than re-decoding every step and
keeps one code path; it gives ``views`` fixed augmentations per item, not a fresh one each epoch.

A second group of rows adds TBPS-CLIP's training tricks one at a time to the N-ITC row (see
:data:`TRICKS`); each trick's own setting is chosen on validation.

Cells: every trained row is one call of :func:`row_cell`, run on ``p.task_runner``
(:mod:`cmr.studies.fanout`): the ablation rows in one wave (independent of each other), then one
wave a trick over the values searched for it, since each trick row keeps the tricks chosen
before it. The augmented features are computed on the driver before the first wave.

Metrics are text->image at identity level (every gallery image of the queried person is a
positive): R@1/5/10, mAP and mINP on the test identities; the epoch is chosen on validation.

Data: ``p.data`` when its reader is ``cuhk_pedes``; otherwise the CUHK-PEDES sample under
``../shared/datasets`` (36 caption entries, 8 persons; far too small for meaningful numbers:
it proves the code path). A source without a train split (the sample has val/test caption
files only) is re-split by identity, so no person is in two splits.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmr.config import Params
from cmr.data.augment import IMAGE_POOL, TEXT_POOL, build_image_augment, build_text_augment
from cmr.data.prepare import Prepared, data_version
from cmr.data.readers import READERS
from cmr.data.schema import Item, by_split
from cmr.errors import ConfigError
from cmr.losses import build_loss
from cmr.stages._common import log, resolve_device
from cmr.studies import STUDIES, output_dir
from cmr.studies._common import TwoTowerHeads, save_figure, start_model, write_table
from cmr.studies.fanout import run_cells
from cmr.training.engine import head_embeddings, train_heads
from cmr.training.features import (FeatureSet, cache_key, cached_backbone_features, compute_backbone_features)
from cmr.training.fit import split_features
from cmr.training.tricks import SoftLabel, TrickHeads, fix_temperature
from cmr.retrieval.evaluation import evaluate_embeddings
from cmr.tracking.study import log_study

SAMPLE = "cuhk_pedes_sample"
COLUMNS = ["group", "row", "losses", "augment", "tricks", "best_epoch", "t2i/R@1", "t2i/R@5", "t2i/R@10", "t2i/mAP", "t2i/mINP",
           "val/rsum"]

#: the ablation: each row adds one group to the previous one
ABLATION = [
    ("baseline InfoNCE", {"infonce": 1.0}, False),
    ("N-ITC", {"nitc": 1.0}, False),
    ("+ R-ITC", {"nitc": 1.0, "ritc": 1.0}, False),
    ("+ SDM", {"nitc": 1.0, "ritc": 1.0, "sdm": 1.0}, False),
    ("+ ID", {"nitc": 1.0, "ritc": 1.0, "sdm": 1.0, "id": 1.0}, False),
    ("+ augmentation", {"nitc": 1.0, "ritc": 1.0, "sdm": 1.0, "id": 1.0}, True),
]

#: TBPS-CLIP's training tricks that apply to heads on cached features: (row, setting, values
#: searched on validation). Rows start from N-ITC and each keeps the previous row's tricks.
#: Not rows, because on locked towers in one process they are always on: global gradients
#: (the loss already sees, and back-propagates through, the whole batch) and locking bottom
#: layers (every tower layer is locked).
TRICKS = [
    ("+ dropout", "dropout", (0.05, 0.1, 0.2)),
    ("+ soft label", "softlabel_ratio", (0.5, 0.25)),
    ("+ fixed temperature", "temperature", (0.02, 0.05)),
]
TRICKS_BASE = ("N-ITC", {"nitc": 1.0})


def dedupe_images(items: list[Item]) -> list[Item]:
    """Keep the first entry per image file: the sample lists person 0005's images in two caption files
    under two person ids, which would put one picture under two identities (and in two splits)."""
    seen, out = set(), []
    for it in items:
        if it.image not in seen:
            seen.add(it.image)
            out.append(it)
    return out


def identity_splits(items: list[Item], val_fraction: float, test_fraction: float, seed: int) -> list[Item]:
    """Split by person: identities in seeded-hash order fill test, then val, the rest is train.

    At least two identities go to test and to val when there are six or more, so identity-level
    retrieval there has negatives.
    """
    ids = sorted({str(it.identity) for it in items},
                 key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    floor = 2 if len(ids) >= 6 else 1
    n_test = max(floor, round(test_fraction * len(ids)))
    n_val = max(floor, round(val_fraction * len(ids)))
    if n_test + n_val >= len(ids):
        raise ConfigError(f"identity split: {len(ids)} identities cannot fill test ({n_test}), val ({n_val}) "
                          "and a train split")
    split = {s: "test" for s in ids[:n_test]} | {s: "val" for s in ids[n_test : n_test + n_val]}
    return [dataclasses.replace(it, split=split.get(str(it.identity), "train")) for it in items]


def person_data(p: Params) -> Prepared:
    """The person-search dataset of the study, deduplicated and with train/val/test by identity."""
    if p.data.reader == "cuhk_pedes":
        source, options = Path(p.data.source), dict(p.data.options)
    else:
        shared = Path(os.environ.get("CMR_SHARED_DATASETS", "../shared/datasets"))
        source, options = shared / SAMPLE, {"skip_missing_images": True}
        log(f"tbps: data.reader is {p.data.reader!r}, not cuhk_pedes; using the sample at {source}")
    result = READERS.get("cuhk_pedes")(source, **options)
    items = dedupe_images(result.items)
    if any(it.identity is None for it in items):
        raise ConfigError(f"{source}: person search needs an identity on every item")
    if not any(it.split == "train" for it in items):
        items = identity_splits(items, p.data.val_fraction, p.data.test_fraction, p.data.split_seed)
    info = {"name": result.name, "reader": "cuhk_pedes", "source": str(source),
            "data_version": data_version(items, result.root, None)}
    return Prepared(items, result.root, None, [], info)


def augmented_features(bundle, prepared: Prepared, bid: str, base: FeatureSet, views: int, k: int, p_text: float,
                       seed: int, device: str, cache_dir: str | None) -> FeatureSet:
    """``base`` followed by ``views`` augmented copies of the train items (same identities)."""
    items = by_split(prepared.items, "train")
    parts = [base]
    for v in range(views):
        image_aug = build_image_augment(IMAGE_POOL, bundle.preprocess_val, k, seed + v)
        text_aug = build_text_augment(TEXT_POOL, p_text, seed + v)
        aug_items = [dataclasses.replace(it, texts=tuple(text_aug(t) for t in it.texts)) for it in items]
        spec = {"backbone": bid, "augment": [list(IMAGE_POOL), k, list(TEXT_POOL), p_text, seed + v]}
        key = cache_key(spec, prepared.info["data_version"], [it.id for it in items])
        img, txt, owner = cached_backbone_features(
            cache_dir, key, lambda: compute_backbone_features(bundle.model, bundle.tokenizer, image_aug, aug_items,
                                                              prepared.root, None, device))
        parts.append(FeatureSet(img, txt, owner, None, base.identity))
    offsets = torch.tensor([0] + [fs.image.shape[0] for fs in parts[:-1]]).cumsum(0)
    return FeatureSet(torch.cat([fs.image for fs in parts]), torch.cat([fs.text for fs in parts]),
                      torch.cat([fs.text_item + off for fs, off in zip(parts, offsets.tolist())]),
                      None, torch.cat([fs.identity for fs in parts]))


def train_row(base_model: nn.Module, losses: dict, tricks: dict, train_fs: FeatureSet, val_fs: FeatureSet,
              n_ids: int, *, epochs: int, batch_size: int, lr: float, weight_decay: float, seed: int,
              device: str) -> tuple[nn.Module, object]:
    """Train a copy of ``base_model``'s heads with ``losses`` and ``tricks`` ({setting: value} of
    :data:`TRICKS`); the epoch is chosen on ``val_fs`` (val/rsum). Returns (heads, TrainResult)."""
    # a fresh copy of what training can change; the locked towers' tensors are shared, not copied
    model = copy.deepcopy(base_model, memo={id(t): t for t in base_model.parameters() if not t.requires_grad})
    if "temperature" in tricks:
        fix_temperature(model, tricks["temperature"])
    soft = tricks.get("softlabel_ratio")
    heads = TrickHeads(model, tricks.get("dropout", 0.0), keep_teacher=soft is not None)
    torch.manual_seed(seed)  # the ID loss's classifier starts alike whatever ran before (and wherever)
    loss_fn = build_loss(losses, {}, model.embed_dim, n_ids)
    if soft is not None:
        loss_fn = SoftLabel(loss_fn, heads, soft, warmup_steps=max(1, train_fs.text.shape[0] // batch_size))
    result = train_heads(heads, loss_fn, train_fs, val_fs, epochs=epochs, batch_size=batch_size, lr=lr,
                         weight_decay=weight_decay, select_metric="val/rsum", seed=seed, device=device,
                         level="identity", log=lambda m: None)
    return heads, result


def row_cell(heads: nn.Module, losses: dict, tricks: dict, train_fs: FeatureSet, val_fs: FeatureSet,
             test_fs: FeatureSet, n_ids: int, **train: Any) -> dict:
    """One row: :func:`train_row` (``train``: its keyword settings), then identity-level text->image
    metrics on ``test_fs``: {"best_epoch", "val_rsum", "test"}. A trick value's cell is scored on
    test too, though only validation chooses the value and only the chosen one is reported: a cell
    returns numbers, not the trained heads, so the driver cannot score the chosen one later."""
    trained, result = train_row(heads, losses, tricks, train_fs, val_fs, n_ids, **train)
    img, txt = head_embeddings(trained, test_fs, train["device"])
    test = evaluate_embeddings(img, txt, test_fs.text_item, "identity", None, test_fs.identity)
    return {"best_epoch": result.best_epoch, "val_rsum": result.best["rsum"], "test": test}


@STUDIES.register("tbps")
def run(p: Params, quick: bool = False) -> dict:
    t_start = time.perf_counter()
    device = resolve_device(p.device)
    prepared = person_data(p)
    bundle, bid = start_model(p, device)
    bundle.model.lock_image_tower()
    bundle.model.lock_text_tower()
    fs = {s: split_features(bundle, prepared, s, bid, device, p.paths.cache) for s in ("train", "val", "test")}
    n_ids = int(fs["train"].identity.max()) + 1
    views, epochs = (1, 3) if quick else (4, 30)
    batch_size = min(p.finetune.batch_size, max(2, fs["train"].text.shape[0] // 2))
    common = dict(epochs=epochs, batch_size=batch_size, lr=p.finetune.lr, weight_decay=p.finetune.weight_decay,
                  seed=p.seed, device=device)
    heads = TwoTowerHeads(bundle.model)
    rows, cells = [], []

    def cell(losses: dict, tricks: dict, train_fs: FeatureSet) -> dict:
        return dict(heads=heads, losses=losses, tricks=tricks, train_fs=train_fs, val_fs=fs["val"],
                    test_fs=fs["test"], n_ids=n_ids, **common)

    def report(group: str, name: str, losses: dict, augment: bool, tricks: dict, done: dict) -> None:
        row = {"group": group, "row": name, "losses": "+".join(losses),
               "augment": f"{views} views" if augment else "none",
               "tricks": ", ".join(f"{k} {v:g}" for k, v in tricks.items()) or "none",
               "best_epoch": done["best_epoch"], "val/rsum": done["val_rsum"],
               **{k: 100 * done["test"][k] for k in COLUMNS if k.startswith("t2i/")}}
        rows.append(row)
        cells.append({"name": f"{group}/{name}", "params": {"group": group, "losses": losses, "augment": augment,
                                                          "views": views if augment else 0, **tricks},
                      "metrics": {k: v for k, v in row.items() if isinstance(v, (int, float))}})
        log(f"tbps: {row}")

    ablation = ABLATION[:2] + ABLATION[-1:] if quick else ABLATION
    aug_fs = None
    if any(augment for _n, _l, augment in ablation):
        aug_fs = augmented_features(bundle, prepared, bid, fs["train"], views, k=2, p_text=0.1, seed=p.seed,
                                    device=device, cache_dir=p.paths.cache)
    done = run_cells(row_cell, [cell(losses, {}, aug_fs if augment else fs["train"])
                                for _n, losses, augment in ablation], p.task_runner, name="tbps-ablation")
    for (name, losses, augment), result in zip(ablation, done):
        report("losses", name, losses, augment, {}, result)

    # training tricks: one more per row; each trick's value is the one with the best val/rsum
    base_name, base_losses = TRICKS_BASE
    tricks: dict = {}
    for name, setting, values in TRICKS:
        values = values[:1] if quick else values
        tried = run_cells(row_cell, [cell(base_losses, {**tricks, setting: value}, fs["train"]) for value in values],
                          p.task_runner, name=f"tbps-{setting}")
        for value, result in zip(values, tried):
            cells.append({"name": f"tricks/select/{setting}={value:g}",
                          "params": {"group": "tricks", "phase": "select", **tricks, setting: value},
                          "metrics": {"val/rsum": result["val_rsum"], "best_epoch": result["best_epoch"]}})
        value, result = max(zip(values, tried), key=lambda t: t[1]["val_rsum"])  # first listed value wins a tie
        tricks = {**tricks, setting: value}
        report("tricks", f"{base_name} {name}", base_losses, False, tricks, result)

    out = output_dir("tbps", quick)
    n_test = {s: int(fs[s].identity.max()) + 1 for s in fs}
    artifacts = write_table(out, rows, COLUMNS, f"TBPS ablation on {prepared.info['name']}: identities "
                            f"train/val/test {n_test['train']}/{n_test['val']}/{n_test['test']}, "
                            f"test gallery {fs['test'].image.shape[0]} images, {fs['test'].text.shape[0]} queries")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 3.5))
    x = range(len(rows))
    ax.plot(x, [r["t2i/R@1"] for r in rows], "o-", label="R@1")
    ax.plot(x, [r["t2i/mAP"] for r in rows], "s-", label="mAP")
    ax.plot(x, [r["t2i/mINP"] for r in rows], "^-", label="mINP")
    first_trick = next(i for i, r in enumerate(rows) if r["group"] == "tricks")
    ax.axvline(first_trick - 0.5, color="grey", ls="--")  # left: loss/augmentation ablation; right: tricks
    ax.set_xticks(list(x), [r["row"] for r in rows], rotation=25, fontsize=7, ha="right")
    ax.set_ylabel("text->image, test (%)")
    ax.legend()
    artifacts.append(save_figure(fig, out / "plot.png"))
    plt.close(fig)
    log_study(uri=p.tracking.uri, experiment=p.tracking.experiment, study="tbps", cells=cells, artifacts=artifacts,
              params={"quick": quick, "epochs": epochs, "views": views, "batch_size": batch_size,
                      "source": prepared.info["source"], "task_runner": p.task_runner},
              tags={"data_version": prepared.info["data_version"], "backbone_id": bid})
    return {"rows": rows, "wall_seconds": time.perf_counter() - t_start}
