"""Stage evaluate: test metrics before and after calibration, validation metrics, a random baseline.

Writes the DVC metrics file (nested: ``val``, ``test.<method>``, ``random``) and
recall@K curves as DVC plots. Only the validation numbers feed model selection and
the registry; the test numbers are reported, never selected on.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cmr.embeddings import load_split
from cmr.errors import DataError
from cmr.io import atomic_path, read_json, read_npz, write_json
from cmr.retrieval.evaluation import both_directions, positives_t2i, score_matrices
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


def write_metrics_and_curves(metrics: dict, scores: dict[str, tuple[torch.Tensor, torch.Tensor]],
                             positives: torch.Tensor, metrics_path: str, plots_dir: str) -> None:
    """Write ``metrics`` (JSON) and ``plots_dir/recall_at_k.csv``: recall@1..min(50, N) per direction
    for each ``name -> (t2i [T, N], i2t [N, T])`` in ``scores`` (``positives``: [T, N] bool)."""
    max_k = min(50, positives.shape[1])
    curves = {f"{d}_{name}": recall_curve(s, p, max_k)
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
                w.writerow([k, *(f"{c[k - 1]:.4f}" for c in curves.values())])
        write_json(metrics_path, metrics)


def run(embeddings_dir: str, calibration_dir: str, level: str, ks: Sequence[int], seed: int,
        metrics_path: str, plots_dir: str) -> dict:
    test, val = load_split(f"{embeddings_dir}/test.npz"), load_split(f"{embeddings_dir}/val.npz")
    cal = read_json(Path(calibration_dir) / "calibration.json")
    method = cal["method"] + cal["suffix"]
    pos = positives_t2i(test.text_item, test.image.shape[0], level, test.labels, test.identity)
    t2i, i2t = score_matrices(test.image, test.text)
    z = read_npz(Path(calibration_dir) / "test_scores.npz", ("t2i", "i2t"))
    c_t2i, c_i2t = torch.from_numpy(z["t2i"]), torch.from_numpy(z["i2t"])
    val_pos = positives_t2i(val.text_item, val.image.shape[0], level, val.labels, val.identity)
    metrics = {
        "val": both_directions(*score_matrices(val.image, val.text), val_pos, ks),
        "test": {"none": both_directions(t2i, i2t, pos, ks), method: both_directions(c_t2i, c_i2t, pos, ks)},
        "random": random_baseline(pos, ks, seed),
        "counts": {"test_items": int(test.image.shape[0]), "test_texts": int(test.text.shape[0]),
                   "val_items": int(val.image.shape[0])},
    }
    write_metrics_and_curves(metrics, {"none": (t2i, i2t), "calibrated": (c_t2i, c_i2t)}, pos, metrics_path, plots_dir)
    chosen = {d: c["method"] for d, c in cal.get("chosen", {}).items()}
    log(f"evaluate: calibration chosen on validation per direction: {chosen}")
    log(f"evaluate: test rsum none={metrics['test']['none']['rsum']:.1f} {method}={metrics['test'][method]['rsum']:.1f}"
        f" random={metrics['random']['rsum']:.1f}")
    return metrics


def from_params(p: Params):
    return run(p.paths.embeddings, p.paths.calibration, p.evaluate.level, p.evaluate.ks, p.seed, p.paths.metrics, p.paths.plots)


def main(argv=None) -> int:
    return stage_main("evaluate", from_params, argv)


if __name__ == "__main__":
    sys.exit(main())
