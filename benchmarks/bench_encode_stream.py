"""Peak memory and wall time of encoding a corpus whole vs in shards (``encode.shard_size``), at several sizes.

Each measurement is a fresh subprocess, so its peak resident memory (``VmHWM``) is its own.
The child loads the offline towers (lite0-minilm, heads freshly initialised), encodes the 32
items of a separate warm-up dataset, resets its peak RSS to the current RSS
(``/proc/self/clear_refs``; where it cannot, notes the peak so far), then loads the prepared
dataset of N items (one split, ``load_prepared``) and encodes it with the encode stage's code,
``encode_split_whole`` (one ``<split>.npz``) or ``encode_split_sharded`` (``<split>.shards/``),
no feature cache, and notes peak RSS and wall time again. "growth" is the peak added by loading
and encoding (after warm-up): both paths hold the item list (O(N), "load"); beyond it the
whole-split path's grows with N, the sharded path's with the shard size. Whole and sharded
alternate at each size, so load drift hits both; ratios are sharded / whole.

By default the items are real (openclipart_mini) and go through towers and heads, which limits
N to hundreds on a CPU. ``--features`` instead writes, per size, a ``features_npz`` source of
SYNTHETIC backbone features (random normal vectors with lite0-minilm's feature dims, labels
from 10 classes), reads it with that reader, writes it with ``save_prepared`` and encodes it
through the same code: ``load_prepared`` (feature rows read from ``features.npz`` per indexing
call), ``compute_backbone_features`` (which returns the stored rows) and the heads. The vectors
are synthetic; the code path is the product's, so N can reach hundreds of thousands.

    .venv/bin/python benchmarks/bench_encode_stream.py                       # 200, 400, 800 items, shards of 100
    .venv/bin/python benchmarks/bench_encode_stream.py --sizes 8 16 --shard-size 4   # quick
    .venv/bin/python benchmarks/bench_encode_stream.py --features --sizes 25000 100000 200000 400000 \
        --shard-size 10000                                                   # synthetic features, ~10 min
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 32  # items encoded before measuring: one image batch


def child(mode: str, warmup_dir: str, prepared_dir: str, out: str, shard_size: int) -> dict:
    """One measurement in this process: warm up on a small dataset, then load the measured one
    and encode its split 'train' whole or in shards."""
    import torch

    from cmr.data.prepare import load_prepared
    from cmr.embeddings import shards_dir
    from cmr.models import build_two_tower
    from cmr.training.encoding import encode_shard, encode_split_sharded, encode_split_whole

    torch.manual_seed(0)
    bundle = build_two_tower("lite0-minilm", embed_dim=256)
    warm = load_prepared(warmup_dir)
    # warm-up with one full image batch (32), so its activations are in the baseline peak for both paths
    encode_shard(bundle, warm.items[:WARMUP], warm.root, warm.features, warm.label_set, None, "cpu")
    before, reset = reset_peak_rss()
    start = time.perf_counter()
    # loading is measured too: what load_prepared keeps (items, feature arrays) is part of what encoding N costs
    prepared = load_prepared(prepared_dir)
    loaded = rss_kib()
    if mode == "whole":
        encode_split_whole(bundle, prepared, "train", "bench", "cpu", Path(out) / "train.npz")
    else:
        encode_split_sharded(bundle, prepared, "train", "bench", "cpu", shards_dir(Path(out) / "train.npz"),
                             shard_size)
    wall = time.perf_counter() - start
    after = peak_rss_kib()
    return {"wall_s": wall, "peak_mib": after / 1024, "growth_mib": (after - before) / 1024,
            "load_mib": (loaded - before) / 1024, "peak_reset": reset}


def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` memory field in KiB (Linux), None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def rss_kib() -> int:
    """This process's resident memory now in KiB (``VmRSS``; elsewhere its peak so far)."""
    now = _status_kib("VmRSS")
    return now if now is not None else peak_rss_kib()


def peak_rss_kib() -> int:
    """This process's peak resident memory in KiB: ``VmHWM`` on Linux, else ``ru_maxrss``.

    ``ru_maxrss`` also counts the peak of the process that spawned it (the kernel carries the
    old memory's peak across ``exec``), so a parent that prepared 400k items would hide the
    child's own peak under its own; ``VmHWM`` is the child's memory alone."""
    peak = _status_kib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak_rss() -> tuple[int, bool]:
    """(peak RSS in KiB, whether it was reset to the current RSS). Linux resets a process's peak
    on writing 5 to /proc/self/clear_refs, so the growth measured next is the encoding's own,
    not hidden under the transient peak of loading the towers; elsewhere the peak stays."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    return peak_rss_kib(), reset


def prepare_sizes(reader: str, source: str, sizes: list[int], root: Path) -> dict[int, tuple[Path, int]]:
    """A prepared dataset (everything in split 'train') of the first N items, for each N: (folder, texts)."""
    from cmr.data.prepare import prepare_dataset, save_prepared

    full = prepare_dataset(reader, source, {}, 0.0, 0.0, 0)
    if max(sizes) > len(full.items):
        raise SystemExit(f"--sizes: {source} has {len(full.items)} items, fewer than {max(sizes)}")
    out = {}
    for n in sizes:
        items = full.items[:n]
        out[n] = (save_prepared(dataclasses.replace(full, items=items), root / f"prepared-{n}"),
                  sum(len(it.texts) for it in items))
    return out


def prepare_synthetic_features(sizes: list[int], root: Path) -> dict[int, tuple[Path, int]]:
    """Per N, a prepared dataset of N items of synthetic backbone features (one text each), all in
    split 'train': (folder, texts). Read by the ``features_npz`` reader and written by
    ``save_prepared``; ``prepare_dataset``'s split assignment and content hashing (minutes at
    400k items, and no part of encoding) are skipped: every item keeps the reader's split, train."""
    import numpy as np

    from cmr.data.prepare import Prepared, save_prepared
    from cmr.data.readers import READERS
    from cmr.models import build_two_tower

    spec = build_two_tower("lite0-minilm", embed_dim=256).model
    dims = {"image": spec.backbone_image_dim, "text": spec.backbone_text_dim}
    del spec
    out = {}
    for n in sizes:
        rng = np.random.default_rng(n)
        source = root / f"source-{n}"
        source.mkdir()
        arrays = {f"train_{m}": rng.standard_normal((n, d), dtype=np.float32) for m, d in dims.items()}
        np.savez(source / "synthetic.npz", train_label=rng.integers(0, 10, n),
                 categories=np.array([f"class{k}" for k in range(10)]), **arrays)
        del arrays
        read = READERS.get("features_npz")(source)
        info = {"name": f"synthetic-{n}", "data_version": f"synthetic-{n}",
                "feature_dims": {m: int(a.shape[1]) for m, a in read.features.items()}}
        out[n] = (save_prepared(Prepared(read.items, read.root, read.features, read.label_set, info),
                                root / f"prepared-{n}"), n)
        del read
        (source / "synthetic.npz").unlink()  # only the prepared copy is read from here on
    return out


def measure(mode: str, warmup_dir: Path, prepared_dir: Path, out: Path, shard_size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(warmup_dir), str(prepared_dir), str(out), str(shard_size)]
    # glibc keeps freed blocks for reuse, so a process's peak RSS drifts by ~100 MiB run to run
    # with how decode and activation buffers happened to fragment; serving every block over
    # 64 KiB by mmap returns it to the system when freed, so the peak tracks live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def max_difference(whole: Path, sharded: Path) -> float:
    from cmr.embeddings import load_split

    a, b = load_split(whole / "train.npz"), load_split(sharded / "train.npz")
    assert a.ids == b.ids and a.texts == b.texts and a.text_item.tolist() == b.text_item.tolist()
    return max(float((a.image - b.image).abs().max()), float((a.text - b.text).abs().max()))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reader", default="openclipart")
    p.add_argument("--source", default=str(Path(__file__).resolve().parents[1] / "data/raw/openclipart_mini"))
    p.add_argument("--sizes", type=int, nargs="+", default=[200, 400, 800])
    p.add_argument("--shard-size", type=int, default=100)
    p.add_argument("--features", action="store_true",
                   help="synthetic precomputed backbone features (heads only) instead of real items")
    p.add_argument("--child", nargs=5, metavar=("MODE", "WARMUP", "PREPARED", "OUT", "SHARD"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        mode, warmup, prepared, out, shard = a.child
        print(json.dumps(child(mode, warmup, prepared, out, int(shard))))
        return
    source = "SYNTHETIC backbone features (features_npz, heads only)" if a.features else a.source
    print(f"threads OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; source {source}; "
          f"shards of {a.shard_size} items; peak = VmHWM of the child while loading and encoding the dataset, growth = "
          f"peak minus the RSS after warm-up (peak reset there; where it could not be, minus the peak so far), "
          f"load = RSS added by load_prepared; wall = load + encode")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-encode-stream-") as tmp:
        tmp = Path(tmp)
        sizes = sorted({WARMUP, *a.sizes})
        datasets = (prepare_synthetic_features(sizes, tmp) if a.features
                    else prepare_sizes(a.reader, a.source, sizes, tmp))
        warmup = datasets[WARMUP][0]
        for n in a.sizes:
            prepared, texts = datasets[n]
            order = ("whole", "sharded") if len(rows) % 2 == 0 else ("sharded", "whole")
            got = {mode: measure(mode, warmup, prepared, tmp / f"{mode}-{n}", a.shard_size) for mode in order}
            w, s = got["whole"], got["sharded"]
            diff = max_difference(tmp / f"whole-{n}", tmp / f"sharded-{n}")
            rows.append((n, w, s))
            if not (w["peak_reset"] and s["peak_reset"]):
                print("note: the peak RSS could not be reset after warm-up; growth is over the warm-up peak")
            print(f"N={n:>6} ({texts} texts)  load {w['load_mib']:6.1f} / {s['load_mib']:6.1f} MiB | "
                  f"whole: peak {w['peak_mib']:7.1f} MiB, growth {w['growth_mib']:6.1f} MiB, "
                  f"{w['wall_s']:6.1f} s | sharded: peak {s['peak_mib']:7.1f} MiB, growth {s['growth_mib']:6.1f} MiB, "
                  f"{s['wall_s']:6.1f} s | ratio sharded / whole: peak {s['peak_mib'] / w['peak_mib']:.3f}, "
                  f"growth {s['growth_mib'] / max(w['growth_mib'], 1e-9):.3f}, wall {s['wall_s'] / w['wall_s']:.3f} "
                  f"| max |whole - sharded| {diff:.1e}")
    if len(rows) > 1:
        (n0, w0, s0), (n1, w1, s1) = rows[0], rows[-1]
        per = lambda a0, a1: (a1 - a0) * 1024 / (n1 - n0)  # KiB an item between the smallest and largest size
        print(f"growth slope {n0}->{n1} items: whole {per(w0['growth_mib'], w1['growth_mib']):.1f} KiB an item, "
              f"sharded {per(s0['growth_mib'], s1['growth_mib']):.1f} KiB an item")


if __name__ == "__main__":
    main()
