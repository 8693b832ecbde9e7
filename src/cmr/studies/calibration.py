"""Study ``calibration``: test-time calibrators and NCL vs InfoNCE training, on two real datasets.

Cells: dataset x training loss (``infonce``, ``ncl``) x test-time calibrator (none, DSL,
QB-Norm, inverted softmax, Sinkhorn) x seed. Heads are trained on frozen backbone
features (cached, so the towers run once per dataset); the epoch is chosen on
validation. Each calibrator's options are chosen per direction on validation
(validation queries and gallery, a training query bank, ``none`` always a candidate,
see :mod:`cmr.stages.calibrate`); the test split is only reported, calibrated with a
training query bank.

Datasets: the embedded default (openclipart_mini: 1-2 texts per image) and GCompris
(1-3 texts per image: the only source in ../shared/datasets with several texts for
many images; tuxpaint has one English text per stamp).
"""
from __future__ import annotations

import copy
import csv
import os
import statistics
import time
from pathlib import Path

import torch

from cmr.config import Params
from cmr.data.prepare import prepare_dataset
from cmr.embeddings import SplitEmbeddings
from cmr.io import atomic_path, write_text
from cmr.losses import build_loss
from cmr.models import build_two_tower
from cmr.retrieval.calibrate import calibrate
from cmr.retrieval.evaluation import both_directions, positives_t2i
from cmr.stages._common import log, resolve_device
from cmr.stages.calibrate import DIRECTIONS, _bank, _gallery, _queries, choose_on_validation
from cmr.studies import STUDIES, output_dir
from cmr.training.engine import head_embeddings, train_heads
from cmr.training.features import FeatureSet
from cmr.training.fit import backbone_id, split_features

CALIBRATORS = ("none", "dsl", "qbnorm", "inverted_softmax", "sinkhorn")
LOSSES = ("infonce", "ncl")
SEEDS = (0, 1, 2)
KS = (1, 5, 10)
# Smaller grids for --quick: two temperatures around the trained heads' own (~1/15).
QUICK_GRIDS = {"sinkhorn": {"epsilon": [0.05, 0.1]}, "dsl": {"temperature": [0.05, 0.1]},
               "qbnorm": {"beta": [10.0, 20.0]}, "inverted_softmax": {"beta": [10.0, 20.0]}}


def datasets(p: Params) -> dict[str, tuple[str, str]]:
    """name -> (reader, source): the pipeline's own dataset and GCompris from ../shared."""
    shared = Path(os.environ.get("CMR_SHARED_DATASETS", "../shared/datasets"))
    return {Path(p.data.source).name: (p.data.reader, p.data.source),
            "gcompris": ("gcompris", str(shared / "gcompris"))}


def _reset_heads(model, initial_state: dict, seed: int) -> None:
    """The model as built, with heads freshly initialised from ``seed``."""
    model.load_state_dict(initial_state)
    torch.manual_seed(seed)
    for head in (model.image_head, model.text_head):
        for module in head.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()


def _embed(model, fs: FeatureSet, device: str) -> SplitEmbeddings:
    image, text = head_embeddings(model, fs, device)
    return SplitEmbeddings(image, text, fs.text_item, [], [], fs.labels, fs.identity)


def evaluate_calibrators(emb: dict[str, SplitEmbeddings], grids: dict, level: str,
                         max_bank: int, seed: int) -> dict[str, dict]:
    """calibrator -> {"metrics": test metrics, "chosen": per-direction choice made on validation}."""
    test = emb["test"]
    pos = positives_t2i(test.text_item, test.image.shape[0], level, test.labels, test.identity)
    out = {}
    for name in CALIBRATORS:
        chosen = choose_on_validation(name, grids.get(name, {}), emb["val"], emb["train"], max_bank, seed, level, KS)
        calibrated = {}
        for d in DIRECTIONS:
            gallery = _gallery(test, d)
            bank = _bank(_queries(emb["train"], d), max_bank, seed) @ gallery.T
            calibrated[d], _ = calibrate(chosen[d].method, _queries(test, d) @ gallery.T, bank, **chosen[d].options)
        metrics = both_directions(calibrated["t2i"].float(), calibrated["i2t"].float(), pos, KS)
        out[name] = {"metrics": metrics, "chosen": {d: {"method": c.method, **c.options} for d, c in chosen.items()}}
    return out


def run_dataset(p: Params, name: str, reader: str, source: str, seeds, epochs: int, grids: dict,
                device: str) -> tuple[list[dict], str]:
    """Cells of one dataset, and its data version."""
    d = p.data
    prepared = prepare_dataset(reader, source, {} if reader != d.reader else d.options, d.val_fraction,
                               d.test_fraction, d.split_seed)
    m = p.model
    bundle = build_two_tower(m.arch, pretrained=m.pretrained, embed_dim=m.embed_dim, device=device)
    model = bundle.model
    model.lock_image_tower()
    model.lock_text_tower()
    bid = backbone_id(None, m.arch, m.pretrained)
    features = {s: split_features(bundle, prepared, s, bid, device, p.paths.cache) for s in ("train", "val", "test")}
    initial = copy.deepcopy(model.state_dict())
    t = p.pretrain
    cells = []
    for loss_name in LOSSES:
        for seed in seeds:
            _reset_heads(model, initial, seed)
            loss_fn = build_loss({loss_name: 1.0}, t.loss_options, model.embed_dim, len(prepared.label_set))
            trained = train_heads(model, loss_fn, features["train"], features["val"], epochs=epochs,
                                  batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay,
                                  select_metric=t.select_metric, seed=seed, device=device,
                                  level=p.evaluate.level, ks=KS, log=lambda _msg: None)
            emb = {s: _embed(model, fs, device) for s, fs in features.items()}
            results = evaluate_calibrators(emb, grids, p.evaluate.level, p.calibrate.max_bank, seed)
            for cal, r in results.items():
                cells.append({"name": f"{name}/{loss_name}/{cal}/seed{seed}",
                              "params": {"dataset": name, "loss": loss_name, "calibrator": cal, "seed": seed,
                                         "epochs": epochs, "best_epoch": trained.best_epoch, "chosen": r["chosen"]},
                              "metrics": r["metrics"]})
            log(f"study calibration: {name} {loss_name} seed {seed}: " + ", ".join(
                f"{c} R@1 {100 * results[c]['metrics']['t2i/R@1']:.1f}/{100 * results[c]['metrics']['i2t/R@1']:.1f}"
                for c in CALIBRATORS))
    return cells, prepared.info["data_version"]


COLUMNS = [f"{d}/R@{k}" for d in DIRECTIONS for k in KS]


def summarise(cells: list[dict]) -> list[dict]:
    """One row per (dataset, loss, calibrator): mean and std over seeds of each R@K, in percent."""
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        key = (c["params"]["dataset"], c["params"]["loss"], c["params"]["calibrator"])
        groups.setdefault(key, []).append(c)
    rows = []
    for (dataset, loss, cal), group in groups.items():
        row = {"dataset": dataset, "loss": loss, "calibrator": cal, "seeds": len(group)}
        for col in COLUMNS + ["rsum"]:
            values = [(100.0 if col != "rsum" else 1.0) * g["metrics"][col] for g in group]
            row[col] = statistics.fmean(values)
            row[f"{col} std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        row["chosen"] = "; ".join(sorted({_describe(g["params"]["chosen"]) for g in group}))
        rows.append(row)
    return rows


def _describe(chosen: dict) -> str:
    parts = []
    for d, c in chosen.items():
        opts = ",".join(f"{k}={v:g}" for k, v in c.items() if k != "method")
        parts.append(f"{d}:{c['method']}" + (f"({opts})" if opts else ""))
    return " ".join(parts)


def markdown_table(rows: list[dict]) -> str:
    head = ["dataset", "loss", "calibrator"] + COLUMNS + ["rsum", "chosen on val (per seed)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["dataset"], r["loss"], r["calibrator"]]
        cells += [f"{r[c]:.1f} ± {r[c + ' std']:.1f}" for c in COLUMNS + ["rsum"]]
        lines.append("| " + " | ".join(cells + [r["chosen"]]) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot(path: Path, rows: list[dict]) -> None:
    """R@1 (mean of both directions) per calibrator; one panel per dataset, one bar per loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 3.8), squeeze=False)
    width = 0.8 / len(LOSSES)
    for ax, dataset in zip(axes[0], names):
        for j, loss in enumerate(LOSSES):
            sel = {r["calibrator"]: r for r in rows if r["dataset"] == dataset and r["loss"] == loss}
            mean = [(sel[c]["t2i/R@1"] + sel[c]["i2t/R@1"]) / 2 for c in CALIBRATORS]
            std = [(sel[c]["t2i/R@1 std"] + sel[c]["i2t/R@1 std"]) / 2 for c in CALIBRATORS]
            ax.bar([i + (j - (len(LOSSES) - 1) / 2) * width for i in range(len(CALIBRATORS))], mean, width,
                   yerr=std, capsize=3, label=f"train: {loss}")
        ax.set_xticks(range(len(CALIBRATORS)), CALIBRATORS, rotation=20)
        ax.set_title(dataset)
        ax.set_ylabel("test R@1, mean of t2i and i2t (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


@STUDIES.register("calibration")
def run(p: Params, quick: bool = False, out_dir: str | Path | None = None) -> dict:
    from cmr.tracking.study import log_study

    t0 = time.perf_counter()
    device = resolve_device(p.device)
    seeds, epochs, grids = (SEEDS[:1], 2, QUICK_GRIDS) if quick else (SEEDS, p.pretrain.epochs, {})
    cells, versions = [], {}
    for name, (reader, source) in datasets(p).items():
        dataset_cells, versions[f"data_version.{name}"] = run_dataset(p, name, reader, source, seeds, epochs,
                                                                      grids, device)
        cells += dataset_cells
    rows = summarise(cells)
    out = Path(out_dir) if out_dir is not None else output_dir("calibration", quick)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "table.csv", rows)
    write_text(out / "table.md", markdown_table(rows))
    plot(out / "r_at_1.png", rows)
    wall = time.perf_counter() - t0
    run_id = log_study(uri=p.tracking.uri, experiment=p.tracking.experiment, study="calibration", cells=cells,
                       artifacts=[out / "table.csv", out / "table.md", out / "r_at_1.png"],
                       params={"quick": quick, "seeds": list(seeds), "epochs": epochs, "grids": grids or "default",
                               "wall_s": round(wall, 1)}, tags=versions)
    log(f"study calibration: {len(cells)} cells in {wall:.0f} s -> {out} (MLflow run {run_id})")
    return {"rows": rows, "run_id": run_id, "out_dir": str(out), "wall_s": wall, "cells": len(cells)}
