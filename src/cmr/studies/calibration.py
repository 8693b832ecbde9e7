"""Study ``calibration``: test-time calibrators and NCL vs InfoNCE training, on two real datasets.

Cells: dataset x training loss (``infonce``, ``ncl``) x setting x test-time calibrator
(none, DSL, QB-Norm, inverted softmax, Sinkhorn with a uniform gallery marginal,
Sinkhorn with the estimated marginal) x seed. Heads are trained on frozen backbone
features (cached, so the towers run once per dataset); the epoch is chosen on
validation. Each calibrator's options are chosen per direction on validation from one
grid of temperatures, multiples of the trained model's own (1 / logit scale), with
``none`` always a candidate; the test split is only reported.

Settings. *inductive* (the headline): the query bank is the training queries, never
the test ones; options are chosen with validation queries against the validation
gallery and the same training bank. *transductive*: the test queries are their own
bank (``calibrate(..., transductive=True)``, metric names carry ``@transductive``), as
DSL and QB-Norm report it; options are chosen with the validation queries as their
own bank.

Sinkhorn's gallery marginal. Text->image: an image should attract query mass in
proportion to the number of texts that will ask for it. The test images' text counts
are test labels, so they are *estimated* from training data
(:func:`cmr.retrieval.calibrate.expected_texts_per_image`: the mean text count of the nearest training
images). Image->text: each text has one image, so the marginal stays uniform.
``sinkhorn_uniform`` keeps the uniform marginal in both directions, for comparison.

Datasets: openclipart (the full shared folder as read by the ``openclipart`` reader:
1-2 texts per image; ``--quick`` uses the embedded 2,250-item subset instead) and
GCompris (1-3 texts per image: the only source in ../shared/datasets with several
texts for many images; tuxpaint has one English text per stamp).
"""
from __future__ import annotations

import copy
import csv
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cmr.config import Params
from cmr.data.prepare import prepare_dataset
from cmr.embeddings import SplitEmbeddings
from cmr.io import atomic_path, write_text
from cmr.losses import build_loss
from cmr.models import build_two_tower
from cmr.retrieval.calibrate import MARGINAL_NEIGHBOURS, TRANSDUCTIVE_SUFFIX
from cmr.retrieval.evaluation import both_directions, positives_t2i
from cmr.stages._common import log, resolve_device
from cmr.stages.calibrate import DIRECTIONS, calibrate_test
from cmr.studies import STUDIES, output_dir
from cmr.training.engine import head_embeddings, train_heads
from cmr.training.features import FeatureSet
from cmr.training.fit import backbone_id, split_features

CALIBRATORS = ("none", "dsl", "qbnorm", "inverted_softmax", "sinkhorn_uniform", "sinkhorn")
SETTINGS = ("inductive", "transductive")
LOSSES = ("infonce", "ncl")
SEEDS = (0, 1, 2)
KS = (1, 5, 10)
#: Temperatures tried, as multiples of the model's own (1 / logit scale), the same for
#: every calibrator (Sinkhorn epsilon, DSL temperature, QB-Norm / inverted-softmax 1/beta).
TEMPERATURE_MULTIPLES = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
QUICK_MULTIPLES = (0.5, 1.0, 2.0)


@dataclass(frozen=True)
class Spec:
    """A study calibrator: the registered method, its temperature option and the marginal it uses."""
    method: str
    option: str | None           # the temperature-like option, None for 'none'
    inverse: bool = False        # option is 1 / temperature (beta)
    estimated_marginal: bool = False


SPECS = {"none": Spec("none", None), "dsl": Spec("dsl", "temperature"),
         "qbnorm": Spec("qbnorm", "beta", inverse=True),
         "inverted_softmax": Spec("inverted_softmax", "beta", inverse=True),
         "sinkhorn_uniform": Spec("sinkhorn", "epsilon"),
         "sinkhorn": Spec("sinkhorn", "epsilon", estimated_marginal=True)}


def datasets(p: Params, quick: bool = False) -> dict[str, tuple[str, str]]:
    """name -> (reader, source): openclipart (the embedded subset for --quick) and GCompris, from ../shared."""
    shared = Path(os.environ.get("CMR_SHARED_DATASETS", "../shared/datasets"))
    first = ({Path(p.data.source).name: (p.data.reader, p.data.source)} if quick
             else {"openclipart": ("openclipart", str(shared / "openclipart"))})
    return {**first, "gcompris": ("gcompris", str(shared / "gcompris"))}


def temperature_grid(name: str, temperature: float, multiples=TEMPERATURE_MULTIPLES) -> dict[str, list[float]]:
    """Option grid of calibrator ``name`` around the model's ``temperature``."""
    spec = SPECS[name]
    if spec.option is None:
        return {}
    temps = [round(temperature * m, 6) for m in multiples]
    return {spec.option: [round(1.0 / t, 4) if spec.inverse else t for t in temps]}


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


def evaluate_calibrators(emb: dict[str, SplitEmbeddings], temperature: float, multiples, level: str,
                         max_bank: int, seed: int) -> dict[tuple[str, str], dict]:
    """(setting, calibrator) -> {"metrics": test metrics, "chosen": per-direction choice made on validation}.

    The transductive setting has no 'none' cell: it is the inductive one (no bank)."""
    test, train = emb["test"], emb["train"]
    pos = positives_t2i(test.text_item, test.image.shape[0], level, test.labels, test.identity)
    out = {}
    for setting in SETTINGS:
        transductive = setting == "transductive"
        for name in CALIBRATORS:
            if transductive and name == "none":
                continue
            spec = SPECS[name]
            picked, calibrated, _ = calibrate_test(spec.method, temperature_grid(name, temperature, multiples),
                                                   emb["val"], test, train, train, transductive, max_bank, seed,
                                                   level, KS, estimate_marginal=spec.estimated_marginal)
            chosen = {d: {"method": c.method, "options": c.options} for d, c in picked.items()}
            # every metric of the setting carries its label, also where validation kept 'none'
            metrics = both_directions(calibrated["t2i"].float(), calibrated["i2t"].float(), pos, KS,
                                      suffix=TRANSDUCTIVE_SUFFIX if transductive else "")
            out[setting, name] = {"metrics": metrics, "chosen": chosen}
    return out


def run_dataset(p: Params, name: str, reader: str, source: str, seeds, epochs: int, multiples,
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
            temperature = 1.0 / float(model.logit_scale.detach().exp())
            results = evaluate_calibrators(emb, temperature, multiples, p.evaluate.level, p.calibrate.max_bank, seed)
            for (setting, cal), r in results.items():
                cells.append({"name": f"{name}/{loss_name}/{setting}/{cal}/seed{seed}",
                              "params": {"dataset": name, "loss": loss_name, "setting": setting, "calibrator": cal,
                                         "seed": seed, "epochs": epochs, "best_epoch": trained.best_epoch,
                                         "temperature": round(temperature, 5), "chosen": r["chosen"]},
                              "metrics": r["metrics"]})
            log(f"study calibration: {name} {loss_name} seed {seed} (T {temperature:.3f}), test R@1 t2i/i2t: "
                + ", ".join(f"{c}{'@tr' if s == 'transductive' else ''} "
                            f"{100 * r['metrics']['t2i/R@1' + _suffix(s)]:.1f}/"
                            f"{100 * r['metrics']['i2t/R@1' + _suffix(s)]:.1f}" for (s, c), r in results.items()))
    return cells, prepared.info["data_version"]


COLUMNS = [f"{d}/R@{k}" for d in DIRECTIONS for k in KS]
DELTAS = [f"{d}/R@1" for d in DIRECTIONS]


def _suffix(setting: str) -> str:
    return TRANSDUCTIVE_SUFFIX if setting == "transductive" else ""


def summarise(cells: list[dict]) -> list[dict]:
    """One row per (dataset, loss, setting, calibrator): mean and std over seeds of each R@K, in percent.

    ``Δ <dir>/R@1`` is the paired difference to 'none' on the same heads (same dataset,
    loss and seed), which removes the seed-to-seed spread that both share.
    """
    none = {(c["params"]["dataset"], c["params"]["loss"], c["params"]["seed"]): c["metrics"]
            for c in cells if c["params"]["calibrator"] == "none"}
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        q = c["params"]
        groups.setdefault((q["dataset"], q["loss"], q["setting"], q["calibrator"]), []).append(c)
    rows = []
    for (dataset, loss, setting, cal), group in groups.items():
        sfx = _suffix(setting)
        row = {"dataset": dataset, "loss": loss, "setting": setting, "calibrator": cal, "seeds": len(group)}
        for col in COLUMNS + ["rsum"]:
            _mean_std(row, col, [(100.0 if col != "rsum" else 1.0) * g["metrics"][col + sfx] for g in group])
        for col in DELTAS:
            _mean_std(row, f"Δ {col}", [100.0 * (g["metrics"][col + sfx] - none[dataset, loss, g["params"]["seed"]][col])
                                        for g in group])
        row["chosen"] = "; ".join(sorted({_describe(g["params"]["chosen"]) for g in group}))
        rows.append(row)
    return rows


def _mean_std(row: dict, col: str, values: list[float]) -> None:
    row[col] = statistics.fmean(values)
    row[f"{col} std"] = statistics.stdev(values) if len(values) > 1 else 0.0


def _describe(chosen: dict) -> str:
    parts = []
    for d, c in chosen.items():
        opts = ",".join(f"{k}={v:.3g}" for k, v in c["options"].items())
        parts.append(f"{d}:{c['method']}" + (f"({opts})" if opts else ""))
    return " ".join(parts)


def markdown_table(rows: list[dict]) -> str:
    cols = COLUMNS + ["rsum"] + [f"Δ {c}" for c in DELTAS]
    head = ["dataset", "loss", "setting", "calibrator"] + cols + ["chosen on val (per seed)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["dataset"], r["loss"], r["setting"], r["calibrator"]]
        cells += [f"{r[c]:+.1f} ± {r[c + ' std']:.1f}" if c.startswith("Δ") else f"{r[c]:.1f} ± {r[c + ' std']:.1f}"
                  for c in cols]
        lines.append("| " + " | ".join(cells + [r["chosen"]]) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot(path: Path, rows: list[dict]) -> None:
    """Paired R@1 gain over 'none' per calibrator (mean ± std over seeds), one bar per direction.

    One panel per dataset and setting; InfoNCE-trained heads (the loss comparison is in the table).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["dataset"] for r in rows))
    cals = [c for c in CALIBRATORS if c != "none"]
    fig, axes = plt.subplots(len(SETTINGS), len(names), figsize=(5.5 * len(names), 3.6 * len(SETTINGS)),
                             squeeze=False)
    width = 0.8 / len(DELTAS)
    for i, setting in enumerate(SETTINGS):
        for ax, dataset in zip(axes[i], names):
            sel = {r["calibrator"]: r for r in rows
                   if r["dataset"] == dataset and r["loss"] == LOSSES[0] and r["setting"] == setting}
            for j, col in enumerate(DELTAS):
                ax.bar([k + (j - (len(DELTAS) - 1) / 2) * width for k in range(len(cals))],
                       [sel[c][f"Δ {col}"] for c in cals], width, yerr=[sel[c][f"Δ {col} std"] for c in cals],
                       capsize=3, label=col.split("/")[0])
            ax.axhline(0.0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(cals)), cals, rotation=20, fontsize=8)
            ax.set_title(f"{dataset}, {setting} ({LOSSES[0]} heads)", fontsize=10)
            ax.set_ylabel("test R@1 minus none (points)")
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
    seeds, epochs, multiples = (SEEDS[:1], 2, QUICK_MULTIPLES) if quick else (SEEDS, p.pretrain.epochs,
                                                                              TEMPERATURE_MULTIPLES)
    cells, versions = [], {}
    for name, (reader, source) in datasets(p, quick).items():
        dataset_cells, versions[f"data_version.{name}"] = run_dataset(p, name, reader, source, seeds, epochs,
                                                                      multiples, device)
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
                       params={"quick": quick, "seeds": list(seeds), "epochs": epochs,
                               "temperature_multiples": list(multiples), "neighbours": MARGINAL_NEIGHBOURS,
                               "wall_s": round(wall, 1)}, tags=versions)
    log(f"study calibration: {len(cells)} cells in {wall:.0f} s -> {out} (MLflow run {run_id})")
    return {"rows": rows, "run_id": run_id, "out_dir": str(out), "wall_s": wall, "cells": len(cells)}
