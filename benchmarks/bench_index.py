"""FAISS search speed and recall against bare torch, measured in one process.

Data: clustered Gaussian embeddings, L2-normalised (random centres, isotropic noise of
``--spread`` times the centre scale), queries drawn from the same mixture: nearest
neighbours are not trivially the own-cluster members, as with real CLIP embeddings.

    .venv/bin/python benchmarks/bench_index.py                      # 100k x 512, 1k queries
    .venv/bin/python benchmarks/bench_index.py --n 5000 --dim 64    # quick
"""
from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
import torch

from cmr.retrieval.index import build_index, recall_vs_exact


def clustered(n: int, dim: int, centres: np.ndarray, spread: float, rng) -> np.ndarray:
    x = centres[rng.integers(0, len(centres), n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def torch_topk(gallery: torch.Tensor, queries: torch.Tensor, k: int, batch: int):
    out = [torch.topk(q @ gallery.T, k, dim=1) for q in queries.split(batch)]
    return torch.cat([o.values for o in out]), torch.cat([o.indices for o in out])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    p.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--hnsw-m", type=int, nargs="+", default=[32], help="one HNSW graph per M and storage")
    p.add_argument("--hnsw-storage", nargs="+", default=["flat", "sq8"], choices=["flat", "sq8", "fp16"],
                   help="vectors the HNSW walk compares: float32, 8-bit or 16-bit scalar-quantised")
    p.add_argument("--ef-construction", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.dim)).astype(np.float32)
    gallery = clustered(args.n, args.dim, centres, args.spread, rng)
    queries = clustered(args.queries, args.dim, centres, args.spread, rng)
    ids = [f"g{i}" for i in range(args.n)]
    g_t, q_t = torch.from_numpy(gallery), torch.from_numpy(queries)
    print(f"data: {args.n} x {args.dim} gallery, {args.queries} queries, {args.clusters} clusters, "
          f"spread {args.spread}; torch threads {torch.get_num_threads()}, faiss omp threads "
          f"{faiss.omp_get_max_threads()}, faiss {faiss.__version__}")

    exact = build_index("flat", gallery, ids, device="cpu")
    top1 = torch_topk(g_t, q_t, 1, 1000)[0]
    print(f"mean top-1 cosine {float(top1.mean()):.3f}")

    t_torch = best_time(lambda: torch_topk(g_t, q_t, args.k, len(q_t)), args.repeats)
    t_torch_b = best_time(lambda: torch_topk(g_t, q_t, args.k, 256), args.repeats)
    t_raw = best_time(lambda: exact.faiss_index.search(queries, args.k), args.repeats)
    t_flat = best_time(lambda: exact.search(queries, args.k), args.repeats)
    t_flat_b = best_time(lambda: [exact.search(queries[i:i + 256], args.k)
                                  for i in range(0, len(queries), 256)], args.repeats)
    base = min(t_torch, t_torch_b)
    print("\nexact top-k (best of %d)" % args.repeats)
    print(f"  torch matmul+topk, one batch     {t_torch:8.3f} s")
    print(f"  torch matmul+topk, batches of 256 {t_torch_b:7.3f} s")
    print(f"  faiss flat, FAISS's default blocks {t_raw:6.3f} s   ratio to best torch {t_raw / base:.2f}")
    print(f"  faiss flat (cmr Index), one call {t_flat:8.3f} s   ratio to best torch {t_flat / base:.2f}")
    print(f"  faiss flat (cmr Index), 256/call {t_flat_b:8.3f} s   ratio to best torch {t_flat_b / base:.2f}")
    _, rows = exact.search(queries, args.k)
    agree = (np.sort(rows, 1) == np.sort(torch_topk(g_t, q_t, args.k, 256)[1].numpy(), 1)).all(1).mean()
    print(f"  flat and torch return the same top-{args.k} set for {agree:.1%} of queries")
    t_exact = min(t_flat, t_flat_b)

    def sweep(name, index, key, values, build_s):
        print(f"\n{name} (build {build_s:.1f} s): {key}, search s, speed-up vs flat, recall@{args.k} vs flat")
        best = None
        for value in values:
            index.tune(**{key: value})
            t = best_time(lambda: index.search(queries, args.k), args.repeats)
            recall = recall_vs_exact(index, exact, queries, args.k)
            print(f"  {value:6d} {t:8.4f} {t_exact / t:8.1f}x {recall:8.3f}")
            if recall >= 0.95 and (best is None or t < best[1]):
                best = (value, t, recall)
        if best:
            print(f"  fastest at recall >= 0.95: {key}={best[0]}, {t_exact / best[1]:.1f}x faster than flat "
                  f"(recall {best[2]:.3f})")
        else:
            print("  no setting reached recall 0.95")

    start = time.perf_counter()
    ivf = build_index("ivf", gallery, ids, device="cpu")
    ivf_build = time.perf_counter() - start
    sweep(f"ivf nlist={ivf.faiss_index.nlist}", ivf, "nprobe",
          [v for v in args.nprobe if v <= ivf.faiss_index.nlist], ivf_build)
    for m in args.hnsw_m:
        for storage in args.hnsw_storage:
            start = time.perf_counter()
            hnsw = build_index("hnsw", gallery, ids, device="cpu", M=m, storage=storage,
                               ef_construction=args.ef_construction)
            sweep(f"hnsw M={m} storage={storage} ef_construction={args.ef_construction}", hnsw, "ef_search",
                  args.ef_search, time.perf_counter() - start)
            del hnsw


if __name__ == "__main__":
    main()
