"""Peak memory and wall time of encoding a corpus whole vs in shards (``encode.shard_size``), at several sizes.

Each measurement is a fresh subprocess, so its peak resident memory (``ru_maxrss``) is its own.
The child loads the offline towers (lite0-minilm, heads freshly initialised) and a prepared
dataset of N real items (one split), encodes 32 warm-up items through towers and heads, notes
its peak RSS, then encodes the split with the encode stage's code, ``encode_split_whole``
(one ``<split>.npz``) or ``encode_split_sharded`` (``<split>.shards/``), no feature cache, and
notes peak RSS and wall time again. "growth" is the peak added by the encoding itself (after
warm-up); the whole-split path's grows with N, the sharded path's with the shard size. Whole
and sharded alternate at each size, so load drift hits both; ratios are sharded / whole.

    .venv/bin/python benchmarks/bench_encode_stream.py                       # 200, 400, 800 items, shards of 100
    .venv/bin/python benchmarks/bench_encode_stream.py --sizes 8 16 --shard-size 4   # quick
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


def child(mode: str, prepared_dir: str, out: str, shard_size: int) -> dict:
    """One measurement in this process: warm up, then encode split 'train' whole or in shards."""
    import torch

    from cmr.data.prepare import load_prepared
    from cmr.embeddings import shards_dir
    from cmr.models import build_two_tower
    from cmr.training.encoding import encode_shard, encode_split_sharded, encode_split_whole

    torch.manual_seed(0)
    bundle = build_two_tower("lite0-minilm", embed_dim=256)
    prepared = load_prepared(prepared_dir)
    # warm-up with one full image batch (32), so its activations are in the baseline peak for both paths
    encode_shard(bundle, prepared.items[:32], prepared.root, None, prepared.label_set, None, "cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    if mode == "whole":
        encode_split_whole(bundle, prepared, "train", "bench", "cpu", Path(out) / "train.npz")
    else:
        encode_split_sharded(bundle, prepared, "train", "bench", "cpu", shards_dir(Path(out) / "train.npz"),
                             shard_size)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"wall_s": wall, "peak_mib": after / 1024, "growth_mib": (after - before) / 1024}


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


def measure(mode: str, prepared_dir: Path, out: Path, shard_size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(prepared_dir), str(out), str(shard_size)]
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
    p.add_argument("--child", nargs=4, metavar=("MODE", "PREPARED", "OUT", "SHARD"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        mode, prepared, out, shard = a.child
        print(json.dumps(child(mode, prepared, out, int(shard))))
        return
    print(f"threads OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; source {a.source}; "
          f"shards of {a.shard_size} items; peak = ru_maxrss of the child, growth = peak minus the peak after warm-up")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-encode-stream-") as tmp:
        tmp = Path(tmp)
        for n, (prepared, texts) in prepare_sizes(a.reader, a.source, a.sizes, tmp).items():
            order = ("whole", "sharded") if len(rows) % 2 == 0 else ("sharded", "whole")
            got = {mode: measure(mode, prepared, tmp / f"{mode}-{n}", a.shard_size) for mode in order}
            w, s = got["whole"], got["sharded"]
            diff = max_difference(tmp / f"whole-{n}", tmp / f"sharded-{n}")
            rows.append((n, w, s))
            print(f"N={n:>6} ({texts} texts)  whole: peak {w['peak_mib']:7.1f} MiB, growth {w['growth_mib']:6.1f} MiB, "
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
