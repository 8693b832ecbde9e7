"""Stage evaluate: test metrics before and after calibration, validation metrics, a random baseline.

Writes the DVC metrics file (nested: ``val``, ``test.<method>``, ``random``; R@K, mAP,
mINP and rsum all in percent) and the plots: ``recall_at_k.csv`` (the curves' numbers),
``recall_at_k.png`` and ``calibration.png`` (images, so ``dvc plots show`` and the MLflow
UI render them with no network). Only the validation numbers feed model selection and
the registry; the test numbers are reported, never selected on.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from cmr.embeddings import load_split
from cmr.errors import DataError
from cmr.io import atomic_path, read_json, read_npz, write_json
from cmr.retrieval.evaluation import both_directions, direction_names, in_percent, positives_t2i, score_matrices
from cmr.retrieval.metrics import recall_curve
from cmr.config import Params
from cmr.stages._common import log, stage_main


def random_baseline(positives: torch.Tensor, ks: Sequence[int], seed: int, draws: int = 5) -> dict[str, float]:
    """Mean metrics of uniformly random rankings (fixed seed): the floor every model must clear."""
    gen = torch.Generator().manual_seed(seed)
    runs = []
    for _ in range(draws):
        t2i = torch.rand(positives.shape, generator=gen)
        runs.append(both_directions(t2i, torch.rand(positives.T.shape, generator=gen), positives, ks))
    return {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}


def _figure(ncols: int):
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(1, ncols, figsize=(5 * ncols, 3.6), squeeze=False)


def plot_recall_curves(curves: dict[str, list[float]], path: Path, names: dict | None = None) -> None:
    """One panel per direction: recall@K (percent) against K, uncalibrated and calibrated."""
    plt, fig, axes = _figure(2)
    for ax, d in zip(axes[0], ("t2i", "i2t")):
        for name, style in (("none", "-"), ("calibrated", "--")):
            if f"{d}_{name}" not in curves:  # a model evaluated without calibration has one curve
                continue
            c = curves[f"{d}_{name}"]
            ax.plot(range(1, len(c) + 1), c, style, label=name)
        ax.set(title=f"{(names or {}).get(d, d)} (test)", xlabel="K", ylabel="R@K (%)", ylim=(0, 100))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def plot_calibration(test: dict, method: str, ks: Sequence[int], chosen: dict, path: Path,
                     names: dict | None = None) -> None:
    """R@K (percent) on the test split before and after calibration, per direction."""
    plt, fig, axes = _figure(2)
    width = 0.38
    for ax, d in zip(axes[0], ("t2i", "i2t")):
        for i, (name, label) in enumerate((("none", "uncalibrated"), (method, method))):
            vals = [test[name][f"{d}/R@{k}"] for k in ks]
            ax.bar([j + (i - 0.5) * width for j in range(len(ks))], vals, width, label=label)
        pick = chosen.get(d, {})
        ax.set(title=f"{(names or {}).get(d, d)} (test); chosen on val: {pick.get('method', method)} {pick.get('options') or ''}".rstrip(),
               xticks=range(len(ks)), xticklabels=[f"R@{k}" for k in ks], ylabel="%")
        ax.legend()
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def write_metrics_and_curves(metrics: dict, scores: dict[str, tuple[torch.Tensor, torch.Tensor]],
                             positives: torch.Tensor, metrics_path: str, plots_dir: str, names: dict | None = None,
                             more_plots: Callable[[Path], None] | None = None) -> None:
    """Write ``metrics`` (JSON) and ``plots_dir``: ``recall_at_k.csv`` (recall@1..min(50, N) in percent
    per direction for each ``name -> (t2i [T, N], i2t [N, T])`` in ``scores``; ``positives``: [T, N]
    bool), its picture ``recall_at_k.png`` and whatever ``more_plots(folder)`` draws."""
    max_k = min(50, positives.shape[1])
    curves = {f"{d}_{name}": [100.0 * r for r in recall_curve(s, p, max_k)]
              for name, (a, b) in scores.items()
              for d, s, p in (("t2i", a, positives), ("i2t", b, positives.T))}
    if Path(plots_dir).exists() and not Path(plots_dir).is_dir():
        raise DataError(plots_dir, "paths.plots is a folder", "it is a file")
    # both written under temporary names first: a failure leaves the previous metrics and plots
    with atomic_path(Path(plots_dir)) as tmp:
        tmp.mkdir()
        with open(tmp / "recall_at_k.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["k", *curves])
            for k in range(1, max_k + 1):
                w.writerow([k, *(f"{c[k - 1]:.2f}" for c in curves.values())])
        plot_recall_curves(curves, tmp / "recall_at_k.png", names)
        if more_plots is not None:
            more_plots(tmp)
        write_json(metrics_path, metrics)


def run(embeddings_dir: str, calibration_dir: str, level: str, ks: Sequence[int], seed: int,
        metrics_path: str, plots_dir: str, gallery: str = "image", query: str = "text") -> dict:
    """Metrics of the embeddings in ``embeddings_dir``; ``t2i`` is query -> gallery whatever the pair
    (``pair`` in the metrics file gives the modalities and the directions' own names)."""
    test, val = load_split(f"{embeddings_dir}/test.npz"), load_split(f"{embeddings_dir}/val.npz")
    cal = read_json(Path(calibration_dir) / "calibration.json")
    method = cal["method"] + cal["suffix"]
    pos = positives_t2i(test.text_item, test.image.shape[0], level, test.labels, test.identity)
    t2i, i2t = score_matrices(test.image, test.text)
    z = read_npz(Path(calibration_dir) / "test_scores.npz", ("t2i", "i2t"))
    c_t2i, c_i2t = torch.from_numpy(z["t2i"]), torch.from_numpy(z["i2t"])
    val_pos = positives_t2i(val.text_item, val.image.shape[0], level, val.labels, val.identity)
    metrics = in_percent({
        "val": both_directions(*score_matrices(val.image, val.text), val_pos, ks),
        "test": {"none": both_directions(t2i, i2t, pos, ks), method: both_directions(c_t2i, c_i2t, pos, ks)},
        "random": random_baseline(pos, ks, seed),
        "counts": {"test_items": int(test.image.shape[0]), "test_texts": int(test.text.shape[0]),
                   "val_items": int(val.image.shape[0])},
        "pair": {"gallery": gallery, "query": query, "directions": direction_names(gallery, query)},
    })
    names = direction_names(gallery, query)
    write_metrics_and_curves(
        metrics, {"none": (t2i, i2t), "calibrated": (c_t2i, c_i2t)}, pos, metrics_path, plots_dir, names,
        lambda folder: plot_calibration(metrics["test"], method, ks, cal.get("chosen", {}), folder / "calibration.png",
                                        names))
    chosen = {d: c["method"] for d, c in cal.get("chosen", {}).items()}
    log(f"evaluate: calibration chosen on validation per direction: {chosen}")
    log(f"evaluate: test rsum none={metrics['test']['none']['rsum']:.1f} {method}={metrics['test'][method]['rsum']:.1f}"
        f" random={metrics['random']['rsum']:.1f}")
    return metrics


def from_params(p: Params):
    return run(p.paths.embeddings, p.paths.calibration, p.evaluate.level, p.evaluate.ks, p.seed, p.paths.metrics,
               p.paths.plots, p.data.gallery, p.data.query)


def main(argv=None) -> int:
    return stage_main("evaluate", from_params, argv)


if __name__ == "__main__":
    sys.exit(main())
