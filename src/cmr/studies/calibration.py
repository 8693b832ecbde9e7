"""Study ``calibration``: test-time calibrators and NCL vs InfoNCE training, on two real datasets.

Cells: dataset x split x training loss (``infonce``, ``ncl``) x setting x test-time
calibrator (none, DSL, QB-Norm, inverted softmax, Sinkhorn with a uniform gallery
marginal, Sinkhorn with the estimated marginal, and the latter with a target bank) x
seed. Each dataset is split ``SPLITS_DEFAULT`` times (``--splits N``; the pipeline's split
first, then fresh random splits with the same fractions): a test split of a few dozen
images moves R@1 by several points per query, so one split cannot rank calibrators, and
five could not either (the ranking on gcompris changed between 5 and 20 splits). Heads are trained
on frozen backbone features (computed once per dataset, cached; other splits reuse them
by item id); the epoch is chosen on validation. Each calibrator's options are chosen per
direction on validation from one grid of temperatures, multiples of the trained model's
own (1 / logit scale), with ``none`` always a candidate; the test split is only reported.

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

Target bank (``sinkhorn_dual``, inductive only). A training query's true match is a
training item, absent from the test gallery, yet plain Sinkhorn makes every bank query
spend all its mass on the test gallery. ``sinkhorn_dual`` adds the bank queries' own
gallery items as extra transport columns (Dual Bank Sinkhorn Normalization, Pan et al.,
ACM MM 2025, on top of NCL's query bank), with the estimated marginal for the test images
and the true bank counts for the bank's own images; image->text rows are weighted by each
bank image's texts, so both sides count (image, text) pairs. It was added after the query-bank
Sinkhorn missed this study's target; it is a separate row, the NCL row is unchanged.

Cells. Each split of each dataset is one independent cell
(:func:`~cmr.studies.calibration_cells.split_cell`: both losses x every seed x every calibrator),
run by ``p.task_runner`` (:mod:`cmr.studies.fanout`); the backbone features are computed once per
dataset on the driver first, and MLflow is written on the driver after every cell returned.

Datasets: openclipart (the full shared folder as read by the ``openclipart`` reader:
1-2 texts per image; ``--quick`` uses the embedded 2,250-item subset instead) and
GCompris (1-3 texts per image: the only source in ../shared/datasets with several
texts for many images; tuxpaint has one English text per stamp).
"""
from __future__ import annotations

import collections
import csv
import math
import os
import statistics
import time
from pathlib import Path

from cmr.config import Params
from cmr.data.prepare import prepare_dataset
from cmr.errors import CmrError
from cmr.io import atomic_path, write_text
from cmr.models import build_two_tower
from cmr.retrieval.calibrate import MARGINAL_NEIGHBOURS, TRANSDUCTIVE_SUFFIX
from cmr.stages._common import log, resolve_device
from cmr.stages.calibrate import DIRECTIONS
from cmr.studies import STUDIES, output_dir
from cmr.studies._common import TwoTowerHeads
from cmr.studies.calibration_cells import (CALIBRATORS, KS, LOSSES, QUICK_MULTIPLES, SETTINGS, SPLITS,
                                           TEMPERATURE_MULTIPLES, pooled_features, resplit, split_cell)
from cmr.studies.fanout import run_cells
from cmr.training.fit import backbone_id, split_features

SEEDS = (0, 1, 2)
#: splits per dataset (``--splits``): offsets 0 .. N-1 from the pipeline's ``data.split_seed``
#: (0 = its own split)
SPLITS_DEFAULT = 20


def datasets(p: Params, quick: bool = False) -> dict[str, tuple[str, str]]:
    """name -> (reader, source): openclipart (the embedded subset for --quick) and GCompris, from ../shared;
    settings for another reader (``--params params/flickr8k.yaml``) run the study on that dataset alone."""
    if p.data.reader != "openclipart":
        return {p.data.reader: (p.data.reader, p.data.source)}
    shared = Path(os.environ.get("CMR_SHARED_DATASETS", "../shared/datasets"))
    first = ({Path(p.data.source).name: (p.data.reader, p.data.source)} if quick
             else {"openclipart": ("openclipart", str(shared / "openclipart"))})
    return {**first, "gcompris": ("gcompris", str(shared / "gcompris"))}


def dataset_cells(p: Params, reader: str, source: str, seeds, epochs: int, multiples, device: str,
                  split_seeds) -> tuple[list[dict], list[int], str]:
    """The cells of one dataset, as keyword arguments of :func:`split_cell` (one a split seed offset in
    ``split_seeds``), their split seeds, and the dataset's data version.

    Backbone features are computed (or read from the cache) here, once for the dataset; other
    splits take them by item id."""
    d = p.data
    options = {} if reader != d.reader else d.options
    base = prepare_dataset(reader, source, options, d.val_fraction, d.test_fraction, d.split_seed)
    m = p.model
    bundle = build_two_tower(m.arch, pretrained=m.pretrained, embed_dim=m.embed_dim, device=device)
    bundle.model.lock_image_tower()
    bundle.model.lock_text_tower()
    heads = TwoTowerHeads(bundle.model)
    bid = backbone_id(None, m.arch, m.pretrained)
    pool, row_of = pooled_features(base, {s: split_features(bundle, base, s, bid, device, p.paths.cache)
                                          for s in SPLITS})
    t = p.pretrain
    cells, split_seed_of = [], []
    for offset in split_seeds:
        split_seed = d.split_seed + offset
        prepared = base if offset == 0 else prepare_dataset(reader, source, options, d.val_fraction,
                                                            d.test_fraction, split_seed)
        if offset and [it.split for it in prepared.items] == [it.split for it in base.items]:
            log(f"study calibration: {source} brings its own train/val/test split; one split, not {len(split_seeds)}")
            break
        cells.append(dict(heads=heads, features=resplit(pool, row_of, prepared), n_classes=len(prepared.label_set),
                          seeds=tuple(seeds), loss_options=t.loss_options, epochs=epochs, batch_size=t.batch_size,
                          lr=t.lr, weight_decay=t.weight_decay, select_metric=t.select_metric,
                          level=p.evaluate.level, multiples=tuple(multiples), max_bank=p.calibrate.max_bank,
                          device=device))
        split_seed_of.append(split_seed)
    return cells, split_seed_of, base.info["data_version"]


def study_cells(name: str, split_seed: int, epochs: int, trained: list[dict]) -> list[dict]:
    """MLflow cells (name, params, metrics) of one split's :func:`split_cell` result, and a log line a pair."""
    cells = []
    for pair in trained:
        loss_name, seed, results = pair["loss"], pair["seed"], pair["results"]
        for (setting, cal), r in results.items():
            cells.append({"name": f"{name}/split{split_seed}/{loss_name}/{setting}/{cal}/seed{seed}",
                          "params": {"dataset": name, "split_seed": split_seed, "loss": loss_name,
                                     "setting": setting, "calibrator": cal, "seed": seed, "epochs": epochs,
                                     "best_epoch": pair["best_epoch"], "temperature": round(pair["temperature"], 5),
                                     "test_images": pair["test_images"], "chosen": r["chosen"]},
                          "metrics": r["metrics"]})
        log(f"study calibration: {name} split {split_seed} {loss_name} seed {seed} (T {pair['temperature']:.3f}), "
            "test R@1 t2i/i2t: "
            + ", ".join(f"{c}{'@tr' if s == 'transductive' else ''} "
                        f"{100 * r['metrics']['t2i/R@1' + _suffix(s)]:.1f}/"
                        f"{100 * r['metrics']['i2t/R@1' + _suffix(s)]:.1f}" for (s, c), r in results.items()))
    return cells


COLUMNS = [f"{d}/R@{k}" for d in DIRECTIONS for k in KS]
DELTAS = [f"{d}/R@1" for d in DIRECTIONS]


def _suffix(setting: str) -> str:
    return TRANSDUCTIVE_SUFFIX if setting == "transductive" else ""


def summarise(cells: list[dict]) -> list[dict]:
    """One row per (dataset, loss, setting, calibrator): mean and std over splits x seeds of each R@K, in percent.

    ``Δ <dir>/R@1`` is the paired difference to 'none' on the same heads (same dataset,
    split, loss and seed), which removes the spread between heads and splits that both share.
    """
    def heads(q):
        return q["dataset"], q["split_seed"], q["loss"], q["seed"]

    none = {heads(c["params"]): c["metrics"] for c in cells if c["params"]["calibrator"] == "none"}
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        q = c["params"]
        groups.setdefault((q["dataset"], q["loss"], q["setting"], q["calibrator"]), []).append(c)
    rows = []
    for (dataset, loss, setting, cal), group in groups.items():
        sfx = _suffix(setting)
        row = {"dataset": dataset, "loss": loss, "setting": setting, "calibrator": cal, "runs": len(group)}
        for col in COLUMNS + ["rsum"]:
            _mean_std(row, col, [(100.0 if col != "rsum" else 1.0) * g["metrics"][col + sfx] for g in group])
        for col in DELTAS:
            deltas: dict[int, list[float]] = {}
            for g in group:
                deltas.setdefault(g["params"]["split_seed"], []).append(
                    100.0 * (g["metrics"][col + sfx] - none[heads(g["params"])][col]))
            _mean_std(row, f"Δ {col}", [d for split_deltas in deltas.values() for d in split_deltas])
            row[f"Δ {col} se"] = split_mean_and_se(deltas)[1]
        row["chosen"] = _describe([g["params"]["chosen"] for g in group])
        rows.append(row)
    return rows


#: the issue's target: Sinkhorn >= each rival in R@1 and never below uncalibrated
RIVALS = ("dsl", "qbnorm", "none")
SINKHORNS = ("sinkhorn", "sinkhorn_dual")
#: a deficit counts as clear when even the mean plus this many standard errors stays below 0
CLEAR = 2.0


def split_mean_and_se(values: dict[int, list[float]]) -> tuple[float, float]:
    """Mean and standard error of a paired difference measured per (split, seed).

    The seeds of one split share its test set, so they are not independent: the mean of
    each split's runs is one observation and the standard error is over splits. With a
    single split it falls back to the seeds' spread (an underestimate, the only one there is).
    """
    means = [statistics.fmean(v) for v in values.values()]
    if len(means) > 1:
        return statistics.fmean(means), statistics.stdev(means) / math.sqrt(len(means))
    only = next(iter(values.values()))
    return means[0], (statistics.stdev(only) / math.sqrt(len(only))) if len(only) > 1 else 0.0


def target_check(cells: list[dict]) -> list[dict]:
    """Per (dataset, loss, setting, direction) and Sinkhorn variant: the paired R@1 difference
    (points) to each rival on the same heads (split, seed): mean, and standard error over
    splits (:func:`split_mean_and_se`); ``met`` when every mean difference is >= 0, and
    ``clearly below`` the rivals it trails by more than ``CLEAR`` standard errors."""
    at: dict[tuple, dict[str, float]] = {}
    for c in cells:
        q = c["params"]
        for direction in DIRECTIONS:
            # 'none' has no transductive cell: the inductive one is the same scores
            settings = SETTINGS if q["calibrator"] == "none" else (q["setting"],)
            for setting in settings:
                key = (q["dataset"], q["loss"], setting, direction, q["split_seed"], q["seed"])
                metric = f"{direction}/R@1{_suffix(q['setting'])}"
                at.setdefault(key, {})[q["calibrator"]] = 100.0 * c["metrics"][metric]
    groups: dict[tuple, dict[int, list[dict[str, float]]]] = {}
    for (dataset, loss, setting, direction, split, _seed), r1 in at.items():
        groups.setdefault((dataset, loss, setting, direction), {}).setdefault(split, []).append(r1)
    rows = []
    for (dataset, loss, setting, direction), per_split in groups.items():
        runs = [r for split_runs in per_split.values() for r in split_runs]
        for variant in SINKHORNS:
            if variant not in runs[0]:
                continue
            row = {"dataset": dataset, "loss": loss, "setting": setting, "direction": direction,
                   "calibrator": variant, "splits": len(per_split), "runs": len(runs)}
            for rival in RIVALS:
                row[f"vs {rival}"], row[f"vs {rival} se"] = split_mean_and_se(
                    {split: [r[variant] - r[rival] for r in split_runs] for split, split_runs in per_split.items()})
            row["met"] = all(row[f"vs {rival}"] >= 0 for rival in RIVALS)
            row["clearly below"] = [rival for rival in RIVALS
                                    if row[f"vs {rival}"] + CLEAR * row[f"vs {rival} se"] < 0]
            rows.append(row)
    return rows


def target_markdown(rows: list[dict]) -> str:
    head = (["dataset", "loss", "setting", "direction", "calibrator", "splits x seeds"]
            + [f"R@1 vs {r}" for r in RIVALS] + ["met (mean >= 0)", f"clearly below (mean + {CLEAR:g} se < 0)"])
    lines = ["Paired test R@1 difference (points) on the same heads: mean over splits x seeds ± standard error "
             "over the splits' means (seeds share a split's test set). Target: >= 0 against every rival; 'met' "
             f"reads the means only; 'clearly below' names the rivals it trails by more than {CLEAR:g} standard "
             "errors.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["dataset"], r["loss"], r["setting"], r["direction"], r["calibrator"],
                 f"{r['splits']} x {r['runs'] // r['splits']}"]
        cells += [f"{r[f'vs {x}']:+.2f} ± {r[f'vs {x} se']:.2f}" for x in RIVALS]
        cells += ["yes" if r["met"] else "no", ", ".join(r["clearly below"]) or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    met = sum(r["met"] for r in rows)
    below = sum(bool(r["clearly below"]) for r in rows)
    return ("\n".join(lines) + f"\n\nmet in {met} of {len(rows)} rows; clearly below a rival "
            f"in {below} of {len(rows)} rows\n")


def _mean_std(row: dict, col: str, values: list[float]) -> None:
    row[col] = statistics.fmean(values)
    row[f"{col} std"] = statistics.stdev(values) if len(values) > 1 else 0.0


def _describe(chosen: list[dict]) -> str:
    """How often validation picked each method, per direction: 't2i sinkhorn 4/5, none 1/5; ...'
    (the options each run chose are in the cells' params)."""
    parts = []
    for d in DIRECTIONS:
        counts = collections.Counter(c[d]["method"] for c in chosen)
        parts.append(f"{d} " + ", ".join(f"{m} {n}/{len(chosen)}" for m, n in counts.most_common()))
    return "; ".join(parts)


def markdown_table(rows: list[dict]) -> str:
    cols = COLUMNS + ["rsum"] + [f"Δ {c}" for c in DELTAS]
    head = ["dataset", "loss", "setting", "calibrator", "runs"] + cols + ["chosen on val"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["dataset"], r["loss"], r["setting"], r["calibrator"], str(r["runs"])]
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
    """Paired R@1 gain over 'none' per calibrator, one bar per direction: mean over splits x
    seeds, error bar one standard error over the splits' means (:func:`split_mean_and_se`).

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
            present = [c for c in cals if c in sel]
            for j, col in enumerate(DELTAS):
                ax.bar([k + (j - (len(DELTAS) - 1) / 2) * width for k in range(len(present))],
                       [sel[c][f"Δ {col}"] for c in present], width,
                       yerr=[sel[c][f"Δ {col} se"] for c in present],
                       capsize=3, label=col.split("/")[0])
            ax.axhline(0.0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(present)), present, rotation=20, fontsize=8)
            ax.set_title(f"{dataset}, {setting} ({LOSSES[0]} heads)", fontsize=10)
            ax.set_ylabel("test R@1 minus none (points)")
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


@STUDIES.register("calibration")
def run(p: Params, quick: bool = False, out_dir: str | Path | None = None, splits: int | None = None) -> dict:
    """The study; ``splits`` random splits per dataset (default 1 with ``quick``, else ``SPLITS_DEFAULT``)."""
    from cmr.tracking.study import log_study

    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= 1000):
        raise CmrError(f"calibration study: --splits must be a whole number from 1 to 1000, got {splits!r}")
    t0 = time.perf_counter()
    device = resolve_device(p.device)
    seeds, epochs, multiples = ((SEEDS[:1], 2, QUICK_MULTIPLES) if quick
                                else (SEEDS, p.pretrain.epochs, TEMPERATURE_MULTIPLES))
    splits = tuple(range(splits if splits is not None else 1 if quick else SPLITS_DEFAULT))
    specs, labels, versions = [], [], {}
    for name, (reader, source) in datasets(p, quick).items():
        found, split_seeds, versions[f"data_version.{name}"] = dataset_cells(p, reader, source, seeds, epochs,
                                                                             multiples, device, splits)
        specs += found
        labels += [(name, split_seed) for split_seed in split_seeds]
    cells = []
    for (name, split_seed), trained in zip(labels, run_cells(split_cell, specs, p.task_runner, name="calibration")):
        cells += study_cells(name, split_seed, epochs, trained)
    rows = summarise(cells)
    # another dataset's study (params/flickr8k.yaml) never overwrites the default one's tables
    name = "calibration" if p.data.reader == "openclipart" else f"calibration-{p.data.reader}"
    out = Path(out_dir) if out_dir is not None else output_dir(name, quick)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "table.csv", rows)
    write_text(out / "table.md", markdown_table(rows))
    target = target_check(cells)
    write_text(out / "target.md", target_markdown(target))
    plot(out / "r_at_1.png", rows)
    wall = time.perf_counter() - t0
    run_id = log_study(uri=p.tracking.uri, experiment=p.tracking.experiment, study="calibration", cells=cells,
                       artifacts=[out / "table.csv", out / "table.md", out / "target.md", out / "r_at_1.png"],
                       params={"quick": quick, "seeds": list(seeds), "epochs": epochs,
                               "split_seeds": [p.data.split_seed + o for o in splits],
                               "temperature_multiples": list(multiples), "neighbours": MARGINAL_NEIGHBOURS,
                               "wall_s": round(wall, 1), "task_runner": p.task_runner}, tags=versions)
    log(f"study calibration: {len(cells)} cells in {wall:.0f} s -> {out} (MLflow run {run_id})")
    return {"rows": rows, "target": target, "run_id": run_id, "out_dir": str(out), "wall_s": wall,
            "cells": len(cells)}
