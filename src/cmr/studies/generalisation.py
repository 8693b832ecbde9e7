"""``cmr study generalisation``: train on one dataset, evaluate zero-shot on others through one config.

Rows are training sets, columns evaluation sets (their test splits, instance level: a caption's
own image is the only positive). Every row starts from the same fresh towers and head
initialisation (``p.model``, ``p.seed``) and trains the heads on cached backbone features with
the ``pretrain`` settings (losses, epochs, lr, batch), selecting the epoch on the *training*
set's validation split; the other datasets are never seen before their test. The first row
(no training) is the floor the heads start from.

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
from cmr.studies._common import prepare, save_figure, write_table
from cmr.training.engine import head_embeddings, train_heads
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


@STUDIES.register("generalisation")
def run(p: Params, quick: bool = False) -> dict:
    t_start = time.perf_counter()
    torch.manual_seed(p.seed)
    device = resolve_device(p.device)
    bundle = build_two_tower(p.model.arch, pretrained=p.model.pretrained, embed_dim=p.model.embed_dim, device=device)
    bundle.model.lock_image_tower()
    bundle.model.lock_text_tower()
    bid = backbone_id(None, p.model.arch, p.model.pretrained)
    sets = datasets(p, quick)
    own = next(iter(sets))
    train_names = [own] if quick else [n for n in sets if n != "tuxpaint"]
    prepared = {n: prepare(p, reader, source, p.data.options if n == own else {}) for n, (reader, source) in sets.items()}
    feats = lambda n, split: split_features(bundle, prepared[n], split, bid, device, p.paths.cache)  # noqa: E731
    test = {n: feats(n, "test") for n in sets}
    epochs = 2 if quick else p.pretrain.epochs

    def evaluate(model) -> dict:
        out = {}
        for n, fs in test.items():
            img, txt = head_embeddings(model, fs, device)
            m = evaluate_embeddings(img, txt, fs.text_item, "instance")
            out |= {f"{n} rsum": m["rsum"], f"{n} t2i R@1": 100 * m["t2i/R@1"], f"{n} i2t R@1": 100 * m["i2t/R@1"]}
        return out

    rows = [{"train set": "none (initial heads)", "best_epoch": 0, **evaluate(bundle.model)}]
    for name in train_names:
        model = copy.deepcopy(bundle.model)
        loss_fn = build_loss(p.pretrain.losses, p.pretrain.loss_options, model.embed_dim,
                             len(prepared[name].label_set))
        result = train_heads(model, loss_fn, feats(name, "train"), feats(name, "val"), epochs=epochs,
                             batch_size=p.pretrain.batch_size, lr=p.pretrain.lr,
                             weight_decay=p.pretrain.weight_decay, select_metric=p.pretrain.select_metric,
                             seed=p.seed, device=device, log=lambda m: None)
        rows.append({"train set": name, "best_epoch": result.best_epoch, **evaluate(model)})
        log(f"generalisation: {rows[-1]}")

    columns = ["train set", "best_epoch"] + [f"{n} {m}" for n in sets for m in ("rsum", "t2i R@1", "i2t R@1")]
    out = output_dir("generalisation", quick)
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
    log_study(uri=p.tracking.uri, experiment=p.tracking.experiment, study="generalisation",
              cells=[{"name": r["train set"], "params": {"train_set": r["train set"]},
                      "metrics": {k: v for k, v in r.items() if k != "train set"}} for r in rows],
              artifacts=artifacts, params={"quick": quick, "epochs": epochs, "losses": p.pretrain.losses},
              tags={f"data_version:{n}": prep.info["data_version"] for n, prep in prepared.items()})
    return {"rows": rows, "wall_seconds": time.perf_counter() - t_start}
