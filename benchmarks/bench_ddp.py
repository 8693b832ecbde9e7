"""Data-parallel training throughput: pairs/s per GPU and scaling efficiency, measured in one run.

Under ``torchrun --nproc_per_node N`` every rank runs the trainer's own epoch loop
(:func:`cmr.training.engine._epoch_runner`: shard, embed, all-gather, loss, gradient all-reduce,
AdamW) on synthetic inputs already on the device (decoding is measured in bench_gpu.py):

1. rank 0 alone, no collectives, ``--per-gpu-batch`` pairs a step (the others wait);
2. all N ranks together, a global batch of N x ``--per-gpu-batch`` pairs (weak scaling).

Scaling efficiency = (pairs/s of N ranks) / (N x pairs/s of rank 0 alone). ``--model towers``:
both towers unlocked, bfloat16 autocast on CUDA (the GPU path); ``heads``: heads on cached
features (the frozen-tower path).

    torchrun --standalone --nproc_per_node 8 benchmarks/bench_ddp.py                 # one 8-GPU machine
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_ddp.py --device cpu --model heads \\
        --per-gpu-batch 8 --steps 2                                                   # CPU/gloo smoke test
"""
from __future__ import annotations

import argparse
import time

import torch

from cmr.losses import build_loss
from cmr.models import build_two_tower
from cmr.training.distributed import init_from_env, shutdown
from cmr.training.engine import _cosine, _epoch_runner, _optimizer
from cmr.training.features import FeatureSet


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_embed(bundle, kind: str, n_pairs: int, device: str):
    """embed(batches) for the trainer: one synthetic image and text per pair, already on the device."""
    model, spec = bundle.model, bundle.spec
    gen = torch.Generator().manual_seed(0)
    if kind == "heads":
        img = torch.randn(n_pairs, spec.image_dim, generator=gen).to(device)
        txt = torch.randn(n_pairs, spec.text_dim, generator=gen).to(device)

        def embed(batches):
            for rows in batches:
                rows = rows.to(device)
                yield model.head_image(img[rows]), model.head_text(txt[rows])

        return embed
    pixels = torch.randn(n_pairs, 3, *spec.image_size, generator=gen).to(device)
    pixels = pixels.contiguous(memory_format=torch.channels_last)
    tokens = bundle.tokenizer([f"a picture of thing number {i}" for i in range(n_pairs)])
    amp = device.startswith("cuda")

    def embed(batches):
        for rows in batches:
            tok = ({k: v[rows].to(device) for k, v in tokens.items()} if isinstance(tokens, dict)
                   else tokens[rows].to(device))
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp):
                out = model.encode_image(pixels[rows.to(device)]), model.encode_text(tok)
            yield out

    return embed


def pairs_per_second(bundle, kind: str, global_batch: int, steps: int, device: str, dist) -> float:
    """Global pairs per second over ``steps`` steps of the epoch loop (after one untimed warm-up step)."""
    model = bundle.model
    loss_fn = build_loss({"infonce": 1.0}, {}, model.embed_dim, 0).to(device)
    opt = _optimizer(model, loss_fn, 1e-5, 0.0)
    sched = _cosine(opt, steps + 1, warmup=1)
    rates = []
    for n_steps in (1, steps):  # warm-up (kernels, allocator), then the timed epoch
        n = n_steps * global_batch
        fs = FeatureSet(torch.empty(n, 0), torch.empty(n, 0), torch.arange(n))
        run = _epoch_runner(model, loss_fn, opt, sched, fs, global_batch, torch.Generator().manual_seed(0),
                            device, make_embed(bundle, kind, n, device), dist)
        if dist is not None:
            dist.barrier()
        sync(device)
        t0 = time.perf_counter()
        run(1)
        sync(device)
        rates.append(n / (time.perf_counter() - t0))
    return rates[-1]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="lite0-minilm")
    ap.add_argument("--model", choices=("towers", "heads"), default="towers")
    ap.add_argument("--per-gpu-batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    dist = init_from_env(args.device)
    device = args.device if dist is None else dist.device
    world, main_rank = (1, True) if dist is None else (dist.world_size, dist.is_main())
    torch.manual_seed(0)
    bundle = build_two_tower(args.arch, pretrained="none", embed_dim=256, device=device)
    if args.model == "heads":
        bundle.model.lock_image_tower()
        bundle.model.lock_text_tower()
    bundle.model.freeze_norm_stats(True)
    single = (pairs_per_second(bundle, args.model, args.per_gpu_batch, args.steps, device, None)
              if main_rank else float("nan"))
    out = {"world_size": world, "single": single}
    if dist is not None:
        dist.barrier()  # the others waited while rank 0 measured alone
        total = pairs_per_second(bundle, args.model, world * args.per_gpu_batch, args.steps, device, dist)
        out |= {"per_gpu": total / world, "efficiency": total / (world * single)}
    if main_rank:
        print(f"{args.model}, {args.arch}, {device.split(':')[0]}, per-process batch {args.per_gpu_batch}, "
              f"{args.steps} steps")
        print(f"1 process:  {single:,.1f} pairs/s")
        if dist is not None:
            print(f"{world} processes: {out['per_gpu']:,.1f} pairs/s per process, "
                  f"{out['per_gpu'] * world:,.1f} in all; scaling efficiency {out['efficiency']:.2f} "
                  f"(1.00 = linear)")
        else:
            print("scaling efficiency: start with torchrun --nproc_per_node N (N >= 2)")
    shutdown(dist)
    return out


if __name__ == "__main__":
    main()
