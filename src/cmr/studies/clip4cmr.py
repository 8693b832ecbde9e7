"""The two CLIP4CMR studies (Zeng & Mao 2022), on Wikipedia features and on a raw image-text dataset.

* ``clip4cmr_imbalance``: train with only p % of one modality's train items
  (p in 100/70/50/30/10, each side in turn). Choice: the pairs are the items that keep
  both modalities; the other modality of a dropped item stays as an *unpaired* item and
  feeds the row-wise class-wise terms (CE, prototype, proxies, centres) through
  :class:`~cmr.models.feature_heads.WithUnpaired`. A pair-wise loss cannot use it.
* ``clip4cmr_sensitivity``: one-at-a-time sweeps of learning rate, batch size,
  temperature and embedding dim around the setting chosen on validation.

Cells: every training is one call of :func:`~cmr.studies.wikipedia.train_objective`, run on
``p.task_runner`` (:mod:`cmr.studies.fanout`) in two waves, since the second depends on the
first: the grid searched on validation for each dataset (and objective), then every cell at the
setting it chose (imbalance: side x percent x seed; sensitivity: each swept value).

Both report class-level mAP (whole gallery, label relevance) on the test split;
every choice is made on validation. The raw dataset is ``params.yaml``'s ``data``
section (default: the embedded openclipart_mini, categories as classes) seen through
the frozen backbone of ``model.arch`` (features from the cache ``paths.cache``).
"""
from __future__ import annotations

import time

import torch

from cmr.studies import STUDIES, output_dir
from cmr.studies._common import save_figure, write_table
from cmr.studies.fanout import run_cells
from cmr.studies.wikipedia import grid, mean_std, train_objective, wikipedia_splits
from cmr.training.features import FeatureSet

PERCENTS = (100, 70, 50, 30, 10)
#: objective name -> (losses, tau kind): a class-wise one (uses unpaired items) and a pair-wise one
IMBALANCE_OBJECTIVES = {"prototype": ({"prototype": 1.0}, None), "infonce": ({"infonce": 1.0}, "temperature")}
SENSITIVITY_OBJECTIVE = ("supcon", {"supcon": 1.0}, "temperature")
SWEEPS = {
    "lr": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "batch_size": (32, 64, 128, 256, 512),
    "tau": (0.02, 0.05, 0.1, 0.2, 0.5),
    "embed_dim": (32, 64, 128, 256, 512),
}


def raw_splits(p) -> tuple[dict[str, FeatureSet], str]:
    """Frozen-backbone features of ``p.data`` (cached), labels = the dataset's classes."""
    from cmr.data.prepare import prepare_dataset
    from cmr.models import build_two_tower
    from cmr.training.fit import backbone_id, split_features

    d = p.data
    prepared = prepare_dataset(d.reader, d.source, d.options, d.val_fraction, d.test_fraction, d.split_seed)
    bundle = _LazyBundle(lambda: build_two_tower(p.model.arch, pretrained=p.model.pretrained,
                                                 embed_dim=p.model.embed_dim, device="cpu"))
    bid = backbone_id(None, p.model.arch, p.model.pretrained)
    splits = {s: split_features(bundle, prepared, s, bid, "cpu", p.paths.cache) for s in ("train", "val", "test")}
    return splits, prepared.info["data_version"]


class _LazyBundle:
    """Builds the towers on first use only: with every split in the feature cache they are never loaded."""

    def __init__(self, build):
        self._build, self._bundle = build, None

    def __getattr__(self, name):
        if self._bundle is None:
            self._bundle = self._build()
        return getattr(self._bundle, name)


def datasets(p, quick: bool) -> dict[str, tuple[dict[str, FeatureSet], str]]:
    wiki, prepared = wikipedia_splits(p.data.val_fraction, p.data.split_seed)
    out = {"wikipedia": (wiki, prepared.info["data_version"])}
    out[p.data.reader] = raw_splits(p)
    return out


def drop_modality(train: FeatureSet, side: str, percent: int, seed: int) -> tuple[FeatureSet, dict]:
    """Keep ``side`` for ``percent`` % of the items (random, fixed by ``seed``).

    Returns the paired FeatureSet (kept items) and the unpaired rest of the other
    modality as {"image"|"text": (features [U, F], labels [U, C])}.
    """
    n = train.image.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_keep = max(1, round(n * percent / 100))
    kept, dropped = order[:n_keep].sort().values, order[n_keep:]
    paired = train.subset(kept.tolist())
    if len(dropped) == 0:
        return paired, {}
    if side == "image":  # their texts survive, without an image
        rows = torch.isin(train.text_item, dropped)
        return paired, {"text": (train.text[rows], train.labels[train.text_item[rows]])}
    return paired, {"image": (train.image[dropped], train.labels[dropped])}


def _center_settings(tau_kind, quick) -> list[dict]:
    """The Wikipedia grid at embed_dim 256 (dim is swept separately), searched on validation."""
    settings = [hp for hp in grid(tau_kind, quick) if hp["embed_dim"] == 256 or quick]
    return [dict(s, epochs=3) for s in settings] if quick else settings


def _select_centers(searches: dict, quick: bool, seed: int, runner: str, name: str) -> dict:
    """key -> the best setting on validation, for ``searches``: key -> (splits, losses, tau kind); every
    grid point of every search is one cell (one wave)."""
    grids = {key: _center_settings(tau_kind, quick) for key, (_s, _l, tau_kind) in searches.items()}
    cells = [dict(splits=searches[key][0], losses=searches[key][1], hp=hp, seed=seed)
             for key, settings in grids.items() for hp in settings]
    done = iter(run_cells(train_objective, cells, runner, name=f"{name}-select"))
    best = {}
    for key, settings in grids.items():
        scored = [(next(done)[0]["avg"], i) for i in range(len(settings))]
        best[key] = settings[max(scored)[1]]
    return best


def _mlflow(p, study, cells, files, tags, seconds, quick):
    from cmr.tracking.study import log_study

    return log_study(uri=p.tracking.uri, experiment=p.tracking.experiment, study=study, cells=cells,
                     artifacts=files, params={"quick": quick, "seconds": round(seconds, 1),
                                              "task_runner": p.task_runner}, tags=tags)


@STUDIES.register("clip4cmr_imbalance")
def run_imbalance(p, quick: bool = False) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = time.perf_counter()
    percents = (100, 30, 10) if quick else PERCENTS
    seeds = [0] if quick else [0, 1, 2]
    cells, rows, curves = [], [], {}
    data = datasets(p, quick)
    tags = {f"data_version/{dname}": version for dname, (_splits, version) in data.items()}
    center = _select_centers({(dname, oname): (splits, losses, tau_kind) for dname, (splits, _v) in data.items()
                              for oname, (losses, tau_kind) in IMBALANCE_OBJECTIVES.items()},
                             quick, p.seed, p.task_runner, "clip4cmr_imbalance")
    keys = [(dname, oname, side, pct, seed) for dname in data for oname in IMBALANCE_OBJECTIVES
            for side in ("image", "text") for pct in percents for seed in seeds]
    specs = []
    for dname, oname, side, pct, seed in keys:
        splits = data[dname][0]
        paired, unpaired = drop_modality(splits["train"], side, pct, seed)
        specs.append(dict(splits={**splits, "train": paired}, losses=IMBALANCE_OBJECTIVES[oname][0],
                          hp=center[dname, oname], seed=seed, unpaired=unpaired))
    done = iter(run_cells(train_objective, specs, p.task_runner, name="clip4cmr_imbalance"))
    for dname in data:
        for oname in IMBALANCE_OBJECTIVES:
            hp = center[dname, oname]
            for side in ("image", "text"):
                for pct in percents:
                    tests = []
                    for seed in seeds:
                        _val, test, epoch = next(done)
                        tests.append(test["avg"])
                        cells.append({"name": f"{dname}/{oname}/{side}{pct}/seed{seed}",
                                      "params": {"dataset": dname, "objective": oname, "side": side,
                                                 "percent": pct, "seed": seed, **hp},
                                      "metrics": {"test/i2t_mAP": test["i2t"], "test/t2i_mAP": test["t2i"],
                                                  "test/mAP": test["avg"], "best_epoch": epoch}})
                    m, s = mean_std(tests)
                    curves.setdefault((dname, oname, side), []).append((pct, m, s))
                    rows.append([dname, oname, f"{side} kept {pct}%", m, s])
    out = output_dir("clip4cmr_imbalance", quick)
    header = ["dataset", "objective", "setting", "test mAP (avg of I2T, T2I)", "std"]
    files = write_table(out, [dict(zip(header, r)) for r in rows], header,
                        f"Modality imbalance: class-level test mAP, {len(seeds)} seed(s)")
    dnames = sorted({k[0] for k in curves})
    fig, axes = plt.subplots(1, len(dnames), figsize=(5 * len(dnames), 4), squeeze=False)
    for ax, dname in zip(axes[0], dnames):
        for (d, oname, side), pts in sorted(curves.items()):
            if d == dname:
                ax.errorbar([q[0] for q in pts], [q[1] for q in pts], yerr=[q[2] for q in pts], marker="o",
                            label=f"{oname}, {side} kept")
        ax.set(title=dname, xlabel="% of one modality's train items kept", ylabel="test mAP")
        ax.invert_xaxis()
        ax.legend(fontsize=8)
    files.append(save_figure(fig, out / "plot.png"))
    plt.close(fig)
    seconds = time.perf_counter() - t0
    run_id = _mlflow(p, "clip4cmr_imbalance", cells, files, tags, seconds, quick)
    return {"curves": {"/".join(k): v for k, v in curves.items()}, "files": [str(f) for f in files],
            "run_id": run_id, "seconds": seconds}


@STUDIES.register("clip4cmr_sensitivity")
def run_sensitivity(p, quick: bool = False) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = time.perf_counter()
    oname, losses, tau_kind = SENSITIVITY_OBJECTIVE
    sweeps = {k: v[1::2] for k, v in SWEEPS.items()} if quick else SWEEPS
    cells, rows, curves, spread = [], [], {}, {}
    data = datasets(p, quick)
    tags = {f"data_version/{dname}": version for dname, (_splits, version) in data.items()}
    centers = _select_centers({dname: (splits, losses, tau_kind) for dname, (splits, _v) in data.items()},
                              quick, p.seed, p.task_runner, "clip4cmr_sensitivity")
    specs = [dict(splits=splits, losses=losses, hp=dict(centers[dname], **{knob: value}), seed=p.seed)
             for dname, (splits, _v) in data.items() for knob, values in sweeps.items() for value in values]
    done = iter(run_cells(train_objective, specs, p.task_runner, name="clip4cmr_sensitivity"))
    for dname in data:
        center = centers[dname]
        for knob, values in sweeps.items():
            pts = []
            for value in values:
                hp = dict(center, **{knob: value})
                val, test, epoch = next(done)
                pts.append((value, val["avg"], test["avg"]))
                cells.append({"name": f"{dname}/{knob}={value}", "params": {"dataset": dname, "knob": knob, **hp},
                              "metrics": {"val/mAP": val["avg"], "test/mAP": test["avg"], "test/i2t_mAP": test["i2t"],
                                          "test/t2i_mAP": test["t2i"], "best_epoch": epoch}})
                rows.append([dname, knob, value, val["avg"], test["avg"], "yes" if value == center[knob] else ""])
            curves[(dname, knob)] = pts
            spread[f"{dname}/{knob}"] = max(q[2] for q in pts) - min(q[2] for q in pts)
    out = output_dir("clip4cmr_sensitivity", quick)
    header = ["dataset", "hyper-parameter", "value", "val mAP", "test mAP", "chosen on val"]
    files = write_table(out, [dict(zip(header, r)) for r in rows], header,
                        f"Sensitivity of {oname}: one-at-a-time sweeps around the validation-chosen setting")
    dnames = sorted({k[0] for k in curves})
    fig, axes = plt.subplots(len(dnames), len(sweeps), figsize=(3.2 * len(sweeps), 3 * len(dnames)), squeeze=False)
    for r, dname in enumerate(dnames):
        for c, knob in enumerate(sweeps):
            pts = curves[(dname, knob)]
            ax = axes[r][c]
            ax.plot([q[0] for q in pts], [q[2] for q in pts], marker="o", label="test")
            ax.plot([q[0] for q in pts], [q[1] for q in pts], marker="x", ls="--", label="val")
            ax.set_xscale("log")
            ax.set(title=f"{dname}: {knob}", ylabel="mAP")
            ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(save_figure(fig, out / "plot.png"))
    plt.close(fig)
    seconds = time.perf_counter() - t0
    run_id = _mlflow(p, "clip4cmr_sensitivity", cells, files, tags, seconds, quick)
    return {"spread": spread, "files": [str(f) for f in files], "run_id": run_id, "seconds": seconds}
