"""Data-parallel training across processes (``torchrun``), with the same result as one process.

Every rank draws the same shuffled global batches (the shuffle generator is seeded alike),
takes its contiguous share of each batch's rows (:meth:`Distributed.shard`) and embeds
only those. The embeddings are all-gathered (:func:`all_gather_with_grad`), so the loss
sees the whole global batch, as in one process; only the local rows carry gradient, as
open_clip and TBPS-CLIP do. Why the gradients then add up to the single-process gradient:

* parameters that make embeddings (towers, heads): the global loss L depends on them
  through each rank's rows, dL/dθ = Σ_r (dL/dE_r)(dE_r/dθ), and rank r's backward computes
  exactly term r; the ranks' gradients are **summed**.
* parameters the loss reads directly (``logit_scale``, the loss's own proxies or
  classifiers): every rank computes the full dL/dθ; the ranks' gradients are **averaged**.

Both go through one all-reduce (:meth:`Distributed.all_reduce_gradients`). So every rank
holds the same gradient, takes the same optimiser step and keeps the same weights, and
every rank evaluates the same validation score and selects the same epoch. Only rank 0
writes outputs, after a barrier that every rank must reach (:func:`write_on_main`): a rank
that crashes before it leaves the previous output untouched.

Not DDP's wrapper: the trainer calls the model's ``head_*`` / ``encode_*`` methods, not
``forward``, and DDP's single averaging rule would mis-scale one of the two groups above.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from cmr.errors import ConfigError
from cmr.io import atomic_path


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job. ``device``: where its tensors live ("cpu" or "cuda:<local_rank>")."""

    rank: int
    world_size: int
    local_rank: int
    device: str

    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, rows: Tensor) -> Tensor:
        """This rank's rows of a global batch: [B] -> [B / world_size], contiguous, so that the
        ranks' shares concatenated in rank order are ``rows`` again."""
        if len(rows) % self.world_size:
            raise ConfigError(f"batch_size: a global batch of {len(rows)} pairs does not split evenly over "
                              f"{self.world_size} processes; pick a batch_size divisible by {self.world_size}")
        per = len(rows) // self.world_size
        return rows[self.rank * per : (self.rank + 1) * per]

    def barrier(self) -> None:
        tdist.barrier()

    def start(self, model: nn.Module, loss_fn: nn.Module, seed: int) -> None:
        """Give every rank rank 0's weights and its own random stream (dropout, augmentation) ``seed + rank``."""
        with torch.no_grad():
            for module in (model, loss_fn):
                for t in module.state_dict().values():
                    tdist.broadcast(t, src=0)
        torch.manual_seed(seed + self.rank)

    def all_reduce_gradients(self, model: nn.Module, loss_fn: nn.Module) -> None:
        """Make every rank's ``.grad`` the single-process gradient of the global batch.

        Sums the gradients of the parameters that make embeddings and averages those of
        ``model.logit_scale`` and ``loss_fn``'s parameters (see the module docstring), in one
        flat all-reduce per dtype. A trainable parameter without a gradient (one the loss did not
        reach, e.g. ``logit_scale`` under a margin loss) takes part as zeros and is left without
        one, as in one process, so that AdamW skips it there too.
        """
        read_by_loss = {id(p) for p in [model.logit_scale, *loss_fn.parameters()]}
        params = [p for p in [*model.parameters(), *loss_fn.parameters()] if p.requires_grad]
        params = list({id(p): p for p in params}.values())  # a parameter shared by both counts once
        # the same code on the same global batch: a gradient is missing on every rank or on none
        missing = [p for p in params if p.grad is None]
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([(p.grad / self.world_size if id(p) in read_by_loss else p.grad).reshape(-1)
                              for p in group])
            tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
            for p, g in zip(group, flat.split([p.numel() for p in group])):
                p.grad.copy_(g.view_as(p.grad))
        for p in missing:
            p.grad = None


def init_from_env(device: str = "cpu", timeout_s: float = 1800.0) -> Distributed | None:
    """Join the process group that ``torchrun`` describes in RANK / WORLD_SIZE / LOCAL_RANK
    (and MASTER_ADDR / MASTER_PORT); ``None`` when WORLD_SIZE is unset or 1 (one process).

    ``device`` "cpu": the gloo backend; "cuda": NCCL, with this process on GPU ``LOCAL_RANK``.
    ``timeout_s``: how long a collective waits for a rank that stopped answering.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    except KeyError as e:
        raise ConfigError(f"WORLD_SIZE={world_size} but {e.args[0]} is not set; start the job with torchrun") from None
    cuda = device.startswith("cuda")
    if cuda:
        if torch.cuda.device_count() <= local_rank:
            raise ConfigError(f"LOCAL_RANK {local_rank} needs GPU {local_rank}, but torch sees "
                              f"{torch.cuda.device_count()} GPU(s); lower --nproc_per_node")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                 **({"device_id": torch.device(device)} if cuda else {}))
    if tdist.get_world_size() != world_size or tdist.get_rank() != rank:
        raise ConfigError(f"a process group already exists with rank {tdist.get_rank()} of "
                          f"{tdist.get_world_size()}, not rank {rank} of {world_size} as the environment says")
    return Distributed(rank, world_size, local_rank, device)


def shutdown(dist: Distributed | None) -> None:
    """Leave the process group (after a successful run; a failed rank just exits)."""
    if dist is not None and tdist.is_initialized():
        tdist.destroy_process_group()


def is_main(dist: Distributed | None) -> bool:
    """True in a single-process run and on rank 0: the process that writes outputs and logs."""
    return dist is None or dist.is_main()


def all_gather_with_grad(x: Tensor) -> Tensor:
    """[b, ...] on each of the N ranks -> [N * b, ...], rank 0's rows first.

    Only this rank's slice is ``x`` itself (gradient flows into it); the other ranks'
    slices are detached copies. Every rank must pass the same shape.
    """
    parts = [torch.empty_like(x) for _ in range(tdist.get_world_size())]
    tdist.all_gather(parts, x.detach().contiguous())
    parts[tdist.get_rank()] = x
    return torch.cat(parts)


@contextlib.contextmanager
def local_main_first(dist: Distributed | None) -> Iterator[None]:
    """Run the body on each machine's local rank 0 first, then on the others: the first
    fills a cache on disk that the others then read instead of racing to write it."""
    if dist is not None and dist.local_rank != 0:
        dist.barrier()
    yield
    if dist is not None and dist.local_rank == 0:
        dist.barrier()


def write_on_main(dist: Distributed | None, path: str | os.PathLike, write: Callable[[Path], None]) -> bool:
    """Once every rank has got here, rank 0 calls ``write(tmp)`` and renames ``tmp`` onto ``path``
    (:func:`cmr.io.atomic_path`); other ranks write nothing. Returns whether this process wrote.

    A rank that failed never reaches the barrier, so rank 0 waits there until the launcher
    stops the job, and ``path`` keeps its previous content.
    """
    if dist is not None:
        dist.barrier()
    if not is_main(dist):
        return False
    with atomic_path(path) as tmp:
        write(tmp)
    return True
