"""NCL Sinkhorn calibration time (cmr's float32 torch loop) against a naive numpy loop, in one process.

Data: query bank, test queries and gallery drawn from one clustered Gaussian mixture and
L2-normalised; scores are cosine similarities, as from a CLIP-style model.

    .venv/bin/python benchmarks/bench_sinkhorn.py                          # 5k x 5k
    .venv/bin/python benchmarks/bench_sinkhorn.py --n 500 --epsilon 0.05   # quick
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cmr.retrieval.calibrate import calibrate, sinkhorn_biases


def clustered(n: int, centres: torch.Tensor, spread: float, gen) -> torch.Tensor:
    x = centres[torch.randint(0, len(centres), (n,), generator=gen)]
    x = x + spread * torch.randn(x.shape, generator=gen)
    return torch.nn.functional.normalize(x, dim=1)


def naive_sinkhorn(scores: np.ndarray, bank: np.ndarray, epsilon: float, stop_thr: float, max_iter: int):
    """Textbook Sinkhorn-Knopp in float64 numpy, one Python iteration at a time."""
    n_bank, n_gallery = bank.shape
    a, b = np.full(n_bank, 1.0 / n_bank), np.full(n_gallery, 1.0 / n_gallery)
    K = np.exp(bank / epsilon)
    v = np.ones(n_gallery)
    for it in range(1, max_iter + 1):
        u = a / (K @ v)
        Ktu = K.T @ u
        if np.linalg.norm(v * Ktu - b) / np.linalg.norm(b) < stop_thr:
            break
        v = b / Ktu
    return scores + epsilon * np.log(v)[None, :], it


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000, help="bank queries = test queries = gallery items")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=200)
    p.add_argument("--spread", type=float, default=1.0)
    p.add_argument("--epsilon", type=float, nargs="+", default=[0.05, 0.02, 0.01])
    p.add_argument("--stop-thr", type=float, default=1e-2)
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(args.seed)
    centres = torch.randn(args.clusters, args.dim, generator=gen) / args.dim ** 0.5
    noise = args.spread / args.dim ** 0.5
    gallery = clustered(args.n, centres, noise, gen)
    bank = clustered(args.n, centres, noise, gen) @ gallery.T
    scores = clustered(args.n, centres, noise, gen) @ gallery.T
    print(f"{args.n} bank queries x {args.n} gallery, {args.n} test queries, dim {args.dim}; "
          f"cosine range [{float(bank.min()):.2f}, {float(bank.max()):.2f}]; torch threads {torch.get_num_threads()}")
    # One-time start-up (POT's backend, torch kernels) is not what we measure.
    calibrate("sinkhorn", scores[:50, :50], bank[:50, :50], epsilon=0.05)
    print("epsilon  method            iters  ours s  naive iters  naive s  naive/ours  top-1 agree  max bias diff")
    for eps in args.epsilon:
        start = time.perf_counter()
        ours, _ = calibrate("sinkhorn", scores, bank, epsilon=eps, stop_thr=args.stop_thr, max_iter=args.max_iter)
        t_ours = time.perf_counter() - start
        # Same solve again, only to report its method and iteration count (not timed).
        info = sinkhorn_biases(bank, epsilon=eps, stop_thr=args.stop_thr, max_iter=args.max_iter)
        start = time.perf_counter()
        naive, naive_iters = naive_sinkhorn(scores.double().numpy(), bank.double().numpy(), eps,
                                            args.stop_thr, args.max_iter)
        t_naive = time.perf_counter() - start
        agree = float((ours.argmax(1).numpy() == naive.argmax(1)).mean())
        diff = (ours.double().numpy() - naive)[0]
        print(f"{eps:<8g} {info.method:17s} {info.n_iter:5d} {t_ours:7.2f} {naive_iters:12d} {t_naive:8.2f} "
              f"{t_naive / t_ours:10.1f}x {agree:11.1%} {np.abs(diff - diff.mean()).max():14.4f}")


if __name__ == "__main__":
    main()
