"""``cmr study generalisation``: train on one dataset, evaluate zero-shot on others through one config.

Rows are training sets, columns evaluation sets (their test splits, instance level: a caption's
own image is the only positive). Every row starts from the same fresh towers and head
initialisation (``p.model``, ``p.seed``) and trains the heads on cached backbone features with
the ``pretrain`` settings (losses, epochs, lr, batch), selecting the epoch on the *training*
set's validation split; the other datasets are never seen before their test. The first row
(no training) is the floor the heads start from.

Each trained row is one independent cell (:func:`train_cell`), run by ``p.task_runner``
(:mod:`cmr.studies.fanout`); the untrained row is only scored, on the driver.

Datasets: ``p.data`` plus, from the shared folder (``CMR_SHARED_DATASETS``, default
``../shared/datasets``), its counterpart across the photo / clip-art gap (Flickr8k for
openclipart and back; full study only), ``gcompris`` and ``tuxpaint``; each split with
``p.data``'s fractions and seed (Flickr8k keeps its own split). Every set but Tux Paint (one text per stamp,
test only) also trains a row.
"""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import torch

from cmr.config import Params
from cmr.losses import build_loss
from cmr.models import build_two_tower
from cmr.retrieval.evaluation import evaluate_embeddings
from cmr.stages._common import log, resolve_device
from cmr.studies import STUDIES, output_dir
from cmr.studies._common import TwoTowerHeads, prepare, save_figure, write_table
from cmr.studies.fanout import run_cells
from cmr.training.engine import head_embeddings, train_heads
from cmr.training.features import FeatureSet
from cmr.training.fit import backbone_id, split_features
from cmr.tracking.study import log_study


#: the other side of the photo / clip-art gap: a study on one also trains on, and tests, the other
COUNTERPART = {"flickr8k": "openclipart", "openclipart": "flickr8k"}


def datasets(p: Params, quick: bool = False) -> dict[str, tuple[str, str]]:
    """name -> (reader, source) of every dataset in the study; ``p.data`` first, then (full study, when
    the shared folder has it) its counterpart across the photo / clip-art gap, GCompris and Tux Paint."""
    shared = Path(os.environ.get("CMR_SHARED_DATASETS", "../shared/datasets"))
    sets = {Path(p.data.source).name: (p.data.reader, p.data.source)}
    other = COUNTERPART.get(p.data.reader)
    if not quick and other and (shared / other).is_dir():
        sets[other] = (other, str(shared / other))
    return sets | {"gcompris": ("gcompris", str(shared / "gcompris")), "tuxpaint": ("tuxpaint", str(shared / "tuxpaint"))}


def scores(model, test: dict[str, FeatureSet], device: str) -> dict[str, float]:
    """rsum and R@1 (percent) both ways on every test set, instance level."""
    out = {}
    for n, fs in test.items():
        img, txt = head_embeddings(model, fs, device)
        m = evaluate_embeddings(img, txt, fs.text_item, "instance")
        out |= {f"{n} rsum": m["rsum"], f"{n} t2i R@1": 100 * m["t2i/R@1"], f"{n} i2t R@1": 100 * m["i2t/R@1"]}
    return out


def train_cell(heads: TwoTowerHeads, losses: dict, loss_options: dict, n_classes: int, train: FeatureSet,
               val: FeatureSet, test: dict[str, FeatureSet], *, epochs: int, batch_size: int, lr: float,
               weight_decay: float, select_metric: str, seed: int, device: str) -> dict:
    """One row: a copy of ``heads`` trained on ``train`` (epoch chosen on ``val``), scored on every
    set of ``test``. Pure: ``heads`` is left as it was."""
    model = copy.deepcopy(heads)
    torch.manual_seed(seed)  # a loss's own parameters (proxies, classifiers) start alike whatever ran before
    loss_fn = build_loss(losses, loss_options, model.embed_dim, n_classes)
    result = train_heads(model, loss_fn, train, val, epochs=epochs, batch_size=batch_size, lr=lr,
                         weight_decay=weight_decay, select_metric=select_metric, seed=seed, device=device,
                         log=lambda m: None)
    return {"best_epoch": result.best_epoch, **scores(model, test, device)}


@STUDIES.register("generalisation")
def run(p: Params, quick: bool = False, out_dir: str | Path | None = None) -> dict:
    """The table, plot and MLflow runs, under ``out_dir`` (default ``studies/generalisation[-quick]/``)."""
    t_start = time.perf_counter()
    torch.manual_seed(p.seed)
    device = resolve_device(p.device)
    bundle = build_two_tower(p.model.arch, pretrained=p.model.pretrained, embed_dim=p.model.embed_dim, device=device)
    bundle.model.lock_image_tower()
    bundle.model.lock_text_tower()
    heads = TwoTowerHeads(bundle.model)
    bid = backbone_id(None, p.model.arch, p.model.pretrained)
    sets = datasets(p, quick)
    own = next(iter(sets))
    # Tux Paint has one text per stamp: tested only. --quick trains the same cells, for 2 epochs
    train_names = [n for n in sets if n != "tuxpaint"]
    prepared = {n: prepare(p, reader, source, p.data.options if n == own else {}) for n, (reader, source) in sets.items()}
    feats = lambda n, split: split_features(bundle, prepared[n], split, bid, device, p.paths.cache)  # noqa: E731
    test = {n: feats(n, "test") for n in sets}
    epochs = 2 if quick else p.pretrain.epochs
    t = p.pretrain
    cells = [dict(heads=heads, losses=t.losses, loss_options=t.loss_options, n_classes=len(prepared[name].label_set),
                  train=feats(name, "train"), val=feats(name, "val"), test=test, epochs=epochs,
                  batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay, select_metric=t.select_metric,
                  seed=p.seed, device=device) for name in train_names]
    rows = [{"train set": "none (initial heads)", "best_epoch": 0, **scores(heads, test, device)}]
    for name, row in zip(train_names, run_cells(train_cell, cells, p.task_runner, name="generalisation")):
        rows.append({"train set": name, **row})
        log(f"generalisation: {rows[-1]}")

    columns = ["train set", "best_epoch"] + [f"{n} {m}" for n in sets for m in ("rsum", "t2i R@1", "i2t R@1")]
    out = Path(out_dir) if out_dir is not None else output_dir("generalisation", quick)
    sizes = ", ".join(f"{n} {test[n].image.shape[0]} images/{test[n].text.shape[0]} texts" for n in sets)
    artifacts = write_table(out, rows, columns, f"Generalisation: train heads on one set, test on each ({sizes})")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar([j + i * width for j in range(len(sets))], [r[f"{n} rsum"] for n in sets], width, label=r["train set"])
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(sets))], list(sets))
    ax.set_ylabel("test rsum (instance level)")
    ax.legend(fontsize=7, title="trained on")
    artifacts.append(save_figure(fig, out / "plot.png"))
    plt.close(fig)
    run_id = log_study(uri=p.tracking.uri, experiment=p.tracking.experiment, study="generalisation",
                       cells=[{"name": r["train set"], "params": {"train_set": r["train set"]},
                               "metrics": {k: v for k, v in r.items() if k != "train set"}} for r in rows],
                       artifacts=artifacts, params={"quick": quick, "epochs": epochs, "losses": p.pretrain.losses,
                                                    "task_runner": p.task_runner},
                       tags={f"data_version:{n}": prep.info["data_version"] for n, prep in prepared.items()})
    return {"rows": rows, "run_id": run_id, "wall_seconds": time.perf_counter() - t_start}
