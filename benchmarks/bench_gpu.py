"""The GPU path in one process: tower fine-tuning throughput (fp32 vs bfloat16 autocast), exact
search on the GPU, and what unlocking the towers buys on validation.

1. Step throughput: one optimisation step (forward, InfoNCE, backward, AdamW) with both towers
   unlocked, fp32 against bfloat16 autocast, on the same batch: pre-decoded pixels (the
   accelerator's share) and with per-step decoding + augmentation (the loop as it runs).
2. Exact top-10 search, 100k x 512 gallery, 1k queries: matmul + top-k on this device against
   the same on the CPU (what FAISS flat is bound by; FAISS itself is measured in bench_index.py).
3. Fine-tuning, the pipeline's own settings (params.yaml): heads on frozen features (the
   ``pretrain`` stage), then ``finetune`` twice from it, towers locked (the default) and
   unlocked (AMP on CUDA). Epochs are selected on validation; the test split is reported.

    python benchmarks/bench_gpu.py                       # a CUDA machine: about 5 min on one H100
    python benchmarks/bench_gpu.py --device cpu --items 96 --steps 1 --epochs 1 --gallery 2000   # smoke test
"""
from __future__ import annotations

import argparse
import dataclasses
import copy
import tempfile
import time
from pathlib import Path

import torch

from cmr.config import load_params, parse_overrides
from cmr.data.prepare import prepare_dataset
from cmr.data.schema import by_split
from cmr.losses import LossInputs, build_loss
from cmr.models import build_two_tower, load_two_tower
from cmr.retrieval.evaluation import evaluate_embeddings
from cmr.training.features import decode_images, image_batches, texts_of
from cmr.training.fit import fit, split_features

REPO = Path(__file__).resolve().parent.parent


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_throughput(bundle, items, root, device: str, amp: bool, steps: int, batch_size: int,
                    decode: bool, workers: int = 0) -> tuple[float, float]:
    """(pairs per second, peak GPU memory in GiB) of ``steps`` training steps after one warm-up."""
    model = copy.deepcopy(bundle.model).to(device).train()
    loss_fn = build_loss({"infonce": 1.0}, {}, model.embed_dim, 0).to(device)
    opt = torch.optim.AdamW(list(model.parameters()) + list(loss_fn.parameters()), lr=1e-5)
    batch = items[:batch_size]
    texts, _ = texts_of(batch)
    texts = [texts[i % len(texts)] for i in range(len(batch))]  # one text per image, as a pair batch
    rels = [it.image for it in batch]
    pixels_once = decode_images(root, rels, bundle.preprocess_train)
    # the training loop's own loader: the same batch decoded and augmented afresh each step
    stream = iter(image_batches(root, [rels] * (steps + 1), bundle.preprocess_train, workers,
                                pin_memory=device.startswith("cuda")))
    tokens_once = bundle.tokenizer(texts)
    item = torch.arange(len(batch), device=device)

    def step():
        pixels = next(stream) if decode else pixels_once
        pixels = pixels.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        tokens = (bundle.tokenizer(texts) if decode else tokens_once).to(device)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp and device.startswith("cuda")):
            img, txt = model.encode_image(pixels), model.encode_text(tokens)
        total, _ = loss_fn(LossInputs(image=img.float(), text=txt.float(), logit_scale=model.logit_scale.exp(),
                                      item=item))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    step()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return steps * len(batch) / seconds, peak


def search_seconds(gallery: torch.Tensor, queries: torch.Tensor, k: int, repeats: int = 3) -> float:
    """Best of ``repeats``: exact inner-product top-k by blocked matmul on the tensors' device."""
    best = float("inf")
    for _ in range(repeats + 1):  # the first round warms up kernels and caches
        sync(str(gallery.device))
        t0 = time.perf_counter()
        torch.topk(queries @ gallery.T, k, dim=1)
        sync(str(gallery.device))
        best = min(best, time.perf_counter() - t0)
    return best


def test_metrics(model_dir: Path, prepared, device: str, workers: int) -> dict[str, float]:
    bundle = load_two_tower(model_dir, device=device)
    fs = split_features(bundle, prepared, "test", f"eval:{model_dir}", device, None, workers)
    model = bundle.model.eval()
    with torch.no_grad():
        img = model.head_image(fs.image.to(device)).float().cpu()
        txt = model.head_text(fs.text.to(device)).float().cpu()
    return evaluate_embeddings(img, txt, fs.text_item, "instance", fs.labels, fs.identity, (1, 5, 10))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--params", default=str(REPO / "params.yaml"))
    p.add_argument("--items", type=int, default=0, help="use only the first N items (0 = all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--gallery", type=int, default=100_000)
    p.add_argument("--epochs", type=int, default=0, help="finetune epochs (0 = params.yaml)")
    p.add_argument("--workers", type=int, default=8, help="image-decoding processes (params.yaml num_workers)")
    p.add_argument("--parts", default="1,2,3", help="which of the three parts to run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override params.yaml for part 3, as `cmr --set`")
    args = p.parse_args(argv)
    dev = args.device
    if dev.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the comparison below

    params = load_params(args.params, parse_overrides(args.overrides))
    parts = {int(x) for x in args.parts.split(",")}
    d = params.data
    prepared = prepare_dataset(d.reader, str(REPO / d.source), d.options, d.val_fraction, d.test_fraction,
                               d.split_seed)
    if args.items:
        prepared = dataclasses.replace(prepared, items=prepared.items[:args.items])
    train = by_split(prepared.items, "train")
    bundle = build_two_tower(params.model.arch, params.model.pretrained, params.model.embed_dim,
                             params.model.head, device="cpu")

    if 1 in parts:
        step_table(bundle, train, prepared.root, dev, args)
    if 2 in parts:
        search_table(dev, args.gallery)
    if 3 in parts:
        finetune_table(params, prepared, dev, args.epochs, args.workers)


def step_table(bundle, train, root, dev, args) -> None:
    print(f"\n1. training step, both towers unlocked, batch {args.batch_size}, {args.steps} steps")
    rates = {}
    for decode, workers in ((False, 0), (True, 0), (True, args.workers)):
        for amp in (False, True):
            rate, peak = step_throughput(bundle, train, root, dev, amp, args.steps, args.batch_size, decode,
                                         workers)
            rates[decode, workers, amp] = rate
            what = f"decode+augment, {workers} workers" if decode else "pre-decoded pixels"
            print(f"  {what:28s} {'bf16 autocast' if amp else 'fp32'}: {rate:8.1f} pairs/s, peak memory {peak:.2f} GiB")
    for (decode, workers, amp), rate in rates.items():
        if amp:
            print(f"  bf16 / fp32 speed-up, {'decode, ' + str(workers) + ' workers' if decode else 'pre-decoded'}: "
                  f"{rate / rates[decode, workers, False]:.2f}x")


def search_table(dev: str, n_gallery: int) -> None:
    print(f"\n2. exact top-10, {n_gallery} x 512 gallery, 1000 queries")
    gen = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(n_gallery, 512, generator=gen), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(1000, 512, generator=gen), dim=1)
    cpu_s = search_seconds(gallery, queries, 10)
    dev_s = search_seconds(gallery.to(dev), queries.to(dev), 10)
    same = torch.equal(torch.topk(queries @ gallery.T, 10).indices,
                       torch.topk(queries.to(dev) @ gallery.to(dev).T, 10).indices.cpu())
    print(f"  cpu ({torch.get_num_threads()} threads) {cpu_s * 1e3:.1f} ms, {dev} {dev_s * 1e3:.2f} ms: "
          f"{cpu_s / dev_s:.0f}x; identical top-10 ids: {same}")


def finetune_table(params, prepared, dev: str, epochs_override: int, workers: int) -> None:
    print("\n3. fine-tuning with the pipeline's settings (validation selects the epoch; test reported)")
    settings = dict(arch=params.model.arch, pretrained=params.model.pretrained, embed_dim=params.model.embed_dim,
                    head=params.model.head, seed=params.seed, device=dev, amp=params.amp, level="instance",
                    ks=(1, 5, 10), cache_dir=None, log=lambda m: print("   ", m), workers=workers)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        runs = {}
        for name, section, init, locked in (("pretrain (heads)", params.pretrain, None, True),
                                            ("finetune, towers locked", params.finetune, out / "pretrain (heads)", True),
                                            ("finetune, towers unlocked", params.finetune, out / "pretrain (heads)", False)):
            print(f"  {name}")
            epochs = epochs_override or section.epochs
            t0 = time.perf_counter()
            result = fit(prepared, str(out / name), init_dir=None if init is None else str(init), lock_image=locked,
                         lock_text=locked, losses=section.losses, loss_options=section.loss_options, epochs=epochs,
                         batch_size=section.batch_size, lr=section.lr, backbone_lr=section.backbone_lr,
                         freeze_bn_stats=section.freeze_bn_stats,
                         weight_decay=section.weight_decay, select_metric=section.select_metric, **settings)
            seconds = time.perf_counter() - t0
            runs[name] = (result, test_metrics(out / name / "model", prepared, dev, workers), seconds)
        print("\n  model                        best epoch  val rsum  test rsum  test t2i R@1  test i2t R@1  seconds")
        for name, (result, test, seconds) in runs.items():
            print(f"  {name:28s} {result.best_epoch:10d} {result.best['rsum']:9.1f} {test['rsum']:10.1f} "
                  f"{100 * test['t2i/R@1']:13.1f} {100 * test['i2t/R@1']:13.1f} {seconds:8.1f}")


if __name__ == "__main__":
    main()
