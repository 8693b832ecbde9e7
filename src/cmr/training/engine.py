"""Training loops for the two-tower model, with model selection on validation only.

Two paths share the loss and the selection logic:

* ``train_heads``: towers locked, backbone features precomputed once
  (:mod:`cmr.training.features`); only the heads, ``logit_scale`` and the loss's own
  parameters (proxies, classifiers) are trained.
* ``train_towers``: at least one tower unlocked; images are decoded and augmented
  every step (the GPU path; AMP with bfloat16 on CUDA).

Each epoch is evaluated on the validation split; the state with the best
``select_metric`` is restored at the end. The test split is never seen here.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from cmr.errors import ConfigError
from cmr.losses import LossInputs
from cmr.progress import progress
from cmr.retrieval.evaluation import evaluate_embeddings
from cmr.retrieval.metrics import require_higher_is_better
from cmr.training.distributed import Distributed, all_gather_with_grad
from cmr.training.features import FeatureSet, _tokens_to, image_batches
from cmr.training.resume import Resume, rng_states, set_rng_states


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one dict per epoch: loss parts, val metrics
    best_epoch: int = 0  # 0 = the starting state (no epoch improved on it)
    best: dict = field(default_factory=dict)  # validation metrics of the selected state


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _pair_batches(fs: FeatureSet, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Batches of text rows, shuffled: every (text, its item) pair once per epoch."""
    order = torch.randperm(fs.text.shape[0], generator=gen)
    n_full = max(1, len(order) // batch_size)
    # drop the ragged tail: a 3-pair batch gives a noisy contrastive gradient
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(n_full)]


def _loss_inputs(img, txt, logit_scale, item, fs: FeatureSet) -> LossInputs:
    return LossInputs(
        image=img, text=txt, logit_scale=logit_scale, item=item,
        labels=None if fs.labels is None else fs.labels[item],
        identity=None if fs.identity is None else fs.identity[item],
    )


@torch.no_grad()
def head_embeddings(model, fs: FeatureSet, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    return model.head_image(fs.image.to(device)).float().cpu(), model.head_text(fs.text.to(device)).float().cpu()


def validate(model, fs: FeatureSet, device: str, level: str, ks: Sequence[int]) -> dict[str, float]:
    img, txt = head_embeddings(model, fs, device)
    return evaluate_embeddings(img, txt, fs.text_item, level, fs.labels, fs.identity, ks)


def _optimizer(model, loss_fn, lr, weight_decay, backbone_lr: float | None = None):
    """AdamW; with ``backbone_lr``, tower parameters (a :class:`TwoTower`'s) get it and heads and
    losses ``lr``; without, everything trainable gets ``lr`` (heads on cached features)."""
    tower = (set() if backbone_lr is None
             else {id(p) for p in model.image_tower_parameters() + model.text_tower_parameters()})
    groups = []
    for params, group_lr in (
        ([p for p in model.parameters() if id(p) in tower], backbone_lr or lr),
        ([p for p in model.parameters() if id(p) not in tower] + list(loss_fn.parameters()), lr),
    ):
        params = [p for p in params if p.requires_grad]
        # biases, norms, logit_scale: decaying them hurts
        groups += [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, "lr": group_lr},
                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": group_lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def _cosine(opt, total_steps: int, warmup: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the state that training can change: all but frozen parameters (locked towers)."""
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()
            if not (isinstance(v, torch.nn.Parameter) and not v.requires_grad)}


def _select(model, loss_fn, epochs: int, run_epoch: Callable[[int], dict], evaluate: Callable[[], dict],
            select_metric: str, log: Callable[[str], None], opt, sched, gen: torch.Generator,
            resume: Resume | None = None) -> TrainResult:
    """Run the epochs, evaluate each on validation, restore the best state.

    With ``resume``, every finished epoch is checkpointed (model, loss, ``opt``, ``sched``,
    every RNG, the selection so far) and a matching checkpoint is continued from.
    """
    key = select_metric.removeprefix("val/")
    require_higher_is_better(select_metric, "select_metric")
    saved = resume.load(log) if resume is not None else None
    if saved is not None:
        result = TrainResult(saved["history"], saved["best_epoch"], saved["best"])
        best_state = (saved["best_model"], saved["best_loss"])
        model.load_state_dict(saved["model"], strict=False)
        loss_fn.load_state_dict(saved["loss"], strict=False)
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        set_rng_states(saved["rng"], gen)
        start = saved["epoch"] + 1
        log(f"resuming after epoch {saved['epoch']} of {epochs} (checkpoint {resume.path})")
    else:
        result = TrainResult()
        best = evaluate()
        if key not in best:
            raise ConfigError(f"select_metric {select_metric!r} is not a validation metric; have "
                              f"{', '.join('val/' + k for k in sorted(best))}")
        result.best = best
        best_state = (_snapshot(model), _snapshot(loss_fn))
        log(f"epoch 0: val {key}={best[key]:.2f}")
        start = 1
    for epoch in range(start, epochs + 1):
        t0 = time.perf_counter()
        parts = run_epoch(epoch)
        metrics = evaluate()
        # the history is part of the stage's DVC output, so it holds only what a rerun
        # reproduces bit for bit; the wall time goes to the log
        result.history.append({"epoch": epoch, **{f"train/{k}": v for k, v in parts.items()},
                               **{f"val/{k}": v for k, v in metrics.items()}})
        if metrics[key] > result.best[key]:
            result.best, result.best_epoch = metrics, epoch
            best_state = (_snapshot(model), _snapshot(loss_fn))
        if resume is not None:
            resume.save({"epoch": epoch, "model": _snapshot(model), "loss": _snapshot(loss_fn),
                         "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_states(gen),
                         "history": result.history, "best": result.best, "best_epoch": result.best_epoch,
                         "best_model": best_state[0], "best_loss": best_state[1]})
        log(f"epoch {epoch}/{epochs}: loss={parts.get('loss', float('nan')):.4f} val {key}={metrics[key]:.2f} "
            f"({time.perf_counter() - t0:.1f} s)")
    model.load_state_dict(best_state[0], strict=False)  # frozen parameters never left their values
    loss_fn.load_state_dict(best_state[1], strict=False)
    return result


def _epoch_runner(model, loss_fn, opt, sched, fs: FeatureSet, batch_size: int, gen: torch.Generator,
                  device: str, embed: Callable[[list[torch.Tensor]], Iterable[tuple]],
                  dist: Distributed | None = None) -> Callable[[int], dict]:
    """One pass over the (text, item) pairs.

    ``embed(batches)`` yields (image [B, D], text [B, D]) for each batch of text rows in
    turn; a generator, so the tower path can decode images ahead of the step. With ``dist``
    (:mod:`cmr.training.distributed`) it gets this rank's B / N rows of each batch, and the
    loss sees the all-gathered global batch.
    """
    labels_fs = _on(fs, device)
    if dist is not None:
        dist.start(model, loss_fn, seed=torch.initial_seed())  # the seed seed_everything set

    def run_epoch(epoch: int) -> dict:
        model.train()
        loss_fn.train()
        sums: dict[str, float] = {}
        batches = _pair_batches(fs, batch_size, gen)
        local = batches if dist is None else [dist.shard(rows) for rows in batches]
        steps = progress(zip(batches, embed(local)), len(batches), f"epoch {epoch}", unit="step")
        for rows, (img, txt) in steps:
            if dist is not None:
                img, txt = all_gather_with_grad(img), all_gather_with_grad(txt)
            item = fs.text_item[rows]
            total, parts = loss_fn(_loss_inputs(img.float(), txt.float(), model.logit_scale.exp(),
                                                item.to(device), labels_fs))
            opt.zero_grad(set_to_none=True)
            total.backward()
            if dist is not None:
                dist.all_reduce_gradients(model, loss_fn)
            opt.step()
            sched.step()
            with torch.no_grad():  # CLIP's clamp: a temperature below 1/100 destabilises training
                model.logit_scale.clamp_(0, math.log(100))
            for k, v in {"loss": total.item(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + v / len(batches)
        return sums

    return run_epoch


def train_heads(model, loss_fn, train: FeatureSet, val: FeatureSet, *, epochs: int, batch_size: int, lr: float,
                weight_decay: float, select_metric: str, seed: int, device: str = "cpu", level: str = "instance",
                ks: Sequence[int] = (1, 5, 10), log: Callable[[str], None] = print,
                dist: Distributed | None = None, resume: Resume | None = None) -> TrainResult:
    """Train heads (+ logit_scale + loss parameters) on cached backbone features; ``dist``: data-parallel."""
    gen = seed_everything(seed)
    model.to(device)
    loss_fn.to(device)
    steps = epochs * max(1, train.text.shape[0] // batch_size)
    opt = _optimizer(model, loss_fn, lr, weight_decay)
    sched = _cosine(opt, steps, warmup=max(1, steps // 20))
    img_all, txt_all = train.image.to(device), train.text.to(device)

    def embed(batches):
        for rows in batches:
            yield model.head_image(img_all[train.text_item[rows].to(device)]), model.head_text(txt_all[rows.to(device)])

    run_epoch = _epoch_runner(model, loss_fn, opt, sched, train, batch_size, gen, device, embed, dist)
    return _select(model, loss_fn, epochs, run_epoch, lambda: validate(model, val, device, level, ks),
                   select_metric, log, opt, sched, gen, resume)


def _on(fs: FeatureSet, device: str) -> FeatureSet:
    return FeatureSet(fs.image, fs.text, fs.text_item,
                      None if fs.labels is None else fs.labels.to(device),
                      None if fs.identity is None else fs.identity.to(device))


def train_towers(model, loss_fn, tokenizer, preprocess_train, encode_val: Callable[[], FeatureSet],
                 train_items, root: Path, train_fs: FeatureSet, *, epochs: int, batch_size: int, lr: float,
                 weight_decay: float, select_metric: str, seed: int, device: str = "cpu", amp: bool = True,
                 backbone_lr: float | None = None, freeze_bn_stats: bool = True, workers: int = 0,
                 level: str = "instance",
                 ks: Sequence[int] = (1, 5, 10), log: Callable[[str], None] = print,
                 dist: Distributed | None = None, resume: Resume | None = None,
                 frozen: set[str] | frozenset = frozenset()) -> TrainResult:
    """Fine-tune with at least one tower (or its top blocks) training; images decoded and augmented
    each step (``workers`` > 0: that many processes decode ahead, see
    :func:`cmr.training.features.image_batches`; ``dist``: data-parallel).

    ``train_fs`` supplies text_item/labels/identity of the train split, and the cached backbone
    features of each tower named in ``frozen`` (nothing of it trains: its rows feed the head, no
    image is decoded or caption tokenised for it; other feature tensors are unused, see
    :func:`cmr.training.fit.split_pairs`); ``encode_val`` returns validation *head* embeddings as a FeatureSet.
    """
    gen = seed_everything(seed)
    model.to(device)
    model.freeze_norm_stats(freeze_bn_stats)
    loss_fn.to(device)
    texts = [t for it in train_items for t in it.texts]
    steps = epochs * max(1, len(texts) // batch_size)
    opt = _optimizer(model, loss_fn, lr, weight_decay, backbone_lr)
    sched = _cosine(opt, steps, warmup=max(1, steps // 20))
    use_amp = amp and device.startswith("cuda")

    def image_inputs(batches):
        if "image" in frozen:
            return (train_fs.image[train_fs.text_item[rows]] for rows in batches)
        rels = [[train_items[i].image for i in train_fs.text_item[rows].tolist()] for rows in batches]
        # the workers' augmentation seed, new each epoch (drawn only with workers: 0 keeps the old stream)
        seed = int(torch.randint(2**31 - 1, (1,), generator=gen)) if workers else 0
        seed += 0 if dist is None else dist.rank  # each rank augments its own images with its own draws
        return image_batches(root, rels, preprocess_train, workers, seed, pin_memory=device.startswith("cuda"))

    def embed(batches):
        for rows, pixels in zip(batches, image_inputs(batches)):
            pixels = pixels.to(device, non_blocking=True)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
                img = (model.head_image(pixels) if "image" in frozen
                       else model.encode_image(pixels.contiguous(memory_format=torch.channels_last)))
                txt = (model.head_text(train_fs.text[rows].to(device)) if "text" in frozen else
                       model.encode_text(_tokens_to(tokenizer([texts[r] for r in rows.tolist()]), device)))
            yield img, txt  # outside autocast: the loss runs in float32

    run_epoch = _epoch_runner(model, loss_fn, opt, sched, train_fs, batch_size, gen, device, embed, dist)

    def evaluate():
        fs = encode_val()
        return evaluate_embeddings(fs.image, fs.text, fs.text_item, level, fs.labels, fs.identity, ks)

    return _select(model, loss_fn, epochs, run_epoch, evaluate, select_metric, log, opt, sched, gen, resume)
