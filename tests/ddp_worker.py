"""One rank of the data-parallel tests (tests/test_distributed.py), started by torchrun:

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py MODE OUT_DIR

MODE "steps" (InfoNCE + CE) or "steps-triplet" (triplet + CE: ``logit_scale`` gets no gradient):
an epoch of the engine's loop under plain SGD; every rank saves the loss and the gradients of
each step to OUT_DIR/rank<r>.pt. MODE "train": a short
``train_heads`` run; rank 0 writes its result to OUT_DIR/run through ``write_on_main``.
MODE "crash": as "train", but rank 1 raises after epoch 1 (OUT_DIR/run must stay as it was).

The tests run the same functions in one process, without ``dist``, as the reference.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cmr.losses import build_loss
from cmr.training.distributed import init_from_env, shutdown, write_on_main
from cmr.training.engine import _epoch_runner, train_heads
from cmr.training.features import FeatureSet

GLOBAL_BATCH = 16
FEAT_IMAGE, FEAT_TEXT, EMBED, CLASSES = 12, 10, 8, 4


class TinyHeads(nn.Module):
    """What the trainer needs of a model: two heads to unit vectors and a learnable logit_scale."""

    def __init__(self):
        super().__init__()
        self.embed_dim = EMBED
        self.image_head = nn.Linear(FEAT_IMAGE, EMBED)
        self.text_head = nn.Sequential(nn.Linear(FEAT_TEXT, 16), nn.GELU(), nn.Linear(16, EMBED))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def head_image(self, x):
        return F.normalize(self.image_head(x), dim=-1)

    def head_text(self, x):
        return F.normalize(self.text_head(x), dim=-1)


def synthetic(n_items: int, gen: torch.Generator, mix: torch.Tensor) -> FeatureSet:
    """Items with 1-2 texts each; a text's features are a fixed linear map of its item's plus noise."""
    image = torch.randn(n_items, FEAT_IMAGE, generator=gen)
    owner = torch.tensor([i for i in range(n_items) for _ in range(1 + i % 2)])
    text = image[owner] @ mix + 0.3 * torch.randn(len(owner), FEAT_TEXT, generator=gen)
    labels = torch.zeros(n_items, CLASSES)
    labels[torch.arange(n_items), torch.arange(n_items) % CLASSES] = 1.0
    return FeatureSet(image, text, owner, labels)


LOSSES = {"steps": {"infonce": 1.0, "ce": 0.5}, "steps-triplet": {"triplet": 1.0, "ce": 0.5}}


def setup(losses=LOSSES["steps"]):
    """(model, loss, train FeatureSet [48 pairs], val FeatureSet), the same in every process."""
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(FEAT_IMAGE, FEAT_TEXT, generator=gen)
    train, val = synthetic(32, gen, mix), synthetic(16, gen, mix)
    torch.manual_seed(0)
    model = TinyHeads()
    # "ce" has its own classifier: parameters the loss reads directly, as logit_scale
    loss = build_loss(losses, {}, EMBED, CLASSES)
    return model, loss, train, val


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of every gradient it steps with (None: the parameter got none)."""

    def __init__(self, named, lr):
        self.names, self.seen = [n for n, _ in named], []
        super().__init__([p for _, p in named], lr=lr)

    def step(self, closure=None):
        params = self.param_groups[0]["params"]
        self.seen.append({n: None if p.grad is None else p.grad.detach().clone()
                          for n, p in zip(self.names, params)})
        return super().step(closure)


def run_steps(dist=None, mode: str = "steps") -> dict:
    """One epoch (three steps of GLOBAL_BATCH pairs) through ``_epoch_runner``: losses and gradients."""
    model, loss, train, _ = setup(LOSSES[mode])
    named = [(f"model.{n}", p) for n, p in model.named_parameters()] + \
            [(f"loss.{n}", p) for n, p in loss.named_parameters()]
    opt = RecordingSGD(named, lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)

    def embed(batches):
        for rows in batches:
            yield model.head_image(train.image[train.text_item[rows]]), model.head_text(train.text[rows])

    parts = _epoch_runner(model, loss, opt, sched, train, GLOBAL_BATCH, gen, "cpu", embed, dist)(1)
    return {"loss": parts["loss"], "grads": opt.seen}


def run_train(dist=None, log=lambda m: None):
    model, loss, train, val = setup()
    result = train_heads(model, loss, train, val, epochs=4, batch_size=GLOBAL_BATCH, lr=1e-2, weight_decay=0.01,
                         select_metric="val/rsum", seed=3, log=log, dist=dist)
    return result, model


def main(mode: str, out: Path) -> None:
    dist = init_from_env("cpu")
    if mode in LOSSES:
        torch.save(run_steps(dist, mode), out / f"rank{dist.rank}.pt")
    else:
        def log(msg: str) -> None:
            if mode == "crash" and dist.rank == 1 and msg.startswith(("epoch 1:", "epoch 1/")):
                raise RuntimeError("rank 1 fails on purpose after epoch 1")

        result, model = run_train(dist, log)

        def write(tmp: Path) -> None:
            tmp.mkdir()
            (tmp / "result.json").write_text(json.dumps({"history": result.history, "best": result.best,
                                                         "best_epoch": result.best_epoch}))
            torch.save(model.state_dict(), tmp / "model.pt")

        write_on_main(dist, out / "run", write)
    shutdown(dist)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
