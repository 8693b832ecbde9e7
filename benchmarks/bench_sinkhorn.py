"""NCL Sinkhorn calibration time (cmr's float32 torch loop) against a naive numpy loop, in one process.

Data: query bank, test queries and gallery drawn from one clustered Gaussian mixture and
L2-normalised; scores are cosine similarities, as from a CLIP-style model.

Timed per epsilon: ``calibrate("sinkhorn")`` as the pipeline calls it (over-relaxation
chosen from the convergence rate), the same with ``omega=1`` (plain Sinkhorn-Knopp), and
the naive float64 loop, all with the same stopping rule. Printed deviations are of the
gallery biases (similarity units, after removing the free constant) from the naive dense
solution, and with ``--reference`` from a float64 solve to 1e-6 whose marginals are
re-checked here from its potentials (slow: minutes at 5k). ``--target-bank`` also times the
solve with a target bank (each bank query's own item beside the gallery: n x 2n), the
calibrate stage's default, as a ratio to the query-bank solve.

    .venv/bin/python benchmarks/bench_sinkhorn.py                          # 5k x 5k
    .venv/bin/python benchmarks/bench_sinkhorn.py --n 500 --epsilon 0.05   # quick
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cmr.retrieval.calibrate import calibrate
from cmr.retrieval.sinkhorn import sinkhorn_biases


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
    p.add_argument("--reference", action="store_true", help="also compare with a float64 solve to 1e-6 (slow)")
    p.add_argument("--target-bank", action="store_true", help="also time Sinkhorn with a target bank (n x 2n)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(args.seed)
    centres = torch.randn(args.clusters, args.dim, generator=gen) / args.dim ** 0.5
    noise = args.spread / args.dim ** 0.5
    gallery = clustered(args.n, centres, noise, gen)
    bank_queries = clustered(args.n, centres, noise, gen)
    bank = bank_queries @ gallery.T
    scores = clustered(args.n, centres, noise, gen) @ gallery.T
    # each bank query's own item (its true match, outside the test gallery), for --target-bank
    own = torch.nn.functional.normalize(bank_queries + noise * torch.randn(bank_queries.shape, generator=gen), dim=1)
    bank_gallery = bank_queries @ own.T
    print(f"{args.n} bank queries x {args.n} gallery, {args.n} test queries, dim {args.dim}; "
          f"cosine range [{float(bank.min()):.2f}, {float(bank.max()):.2f}]; torch threads {torch.get_num_threads()}")
    # One-time start-up (POT's backend, torch kernels) is not what we measure.
    calibrate("sinkhorn", scores[:50, :50], bank[:50, :50], epsilon=0.05)
    print("epsilon  method            omega  iters  ours s  plain iters  plain s  naive iters  naive s  "
          "naive/ours  top-1 agree  max bias diff  plain bias diff")
    for eps in args.epsilon:
        start = time.perf_counter()
        ours, _ = calibrate("sinkhorn", scores, bank, epsilon=eps, stop_thr=args.stop_thr, max_iter=args.max_iter)
        t_ours = time.perf_counter() - start
        start = time.perf_counter()
        plain, _ = calibrate("sinkhorn", scores, bank, epsilon=eps, stop_thr=args.stop_thr, max_iter=args.max_iter,
                             omega=1.0)
        t_plain = time.perf_counter() - start
        # Same solves again, only to report method, omega and iteration counts (not timed).
        info = sinkhorn_biases(bank, epsilon=eps, stop_thr=args.stop_thr, max_iter=args.max_iter)
        info_plain = sinkhorn_biases(bank, epsilon=eps, stop_thr=args.stop_thr, max_iter=args.max_iter, omega=1.0)
        start = time.perf_counter()
        naive, naive_iters = naive_sinkhorn(scores.double().numpy(), bank.double().numpy(), eps,
                                            args.stop_thr, args.max_iter)
        t_naive = time.perf_counter() - start
        agree = float((ours.argmax(1).numpy() == naive.argmax(1)).mean())
        naive_bias = naive[0] - scores[0].double().numpy()
        print(f"{eps:<8g} {info.method:17s} {info.omega:5.2f} {info.n_iter:6d} {t_ours:7.2f} {info_plain.n_iter:12d} "
              f"{t_plain:8.2f} {naive_iters:12d} {t_naive:8.2f} {t_naive / t_ours:10.1f}x {agree:11.1%} "
              f"{bias_gap(info.gallery_bias, naive_bias):14.4f} {bias_gap(info_plain.gallery_bias, naive_bias):16.4f}")
        if args.target_bank:
            start = time.perf_counter()
            calibrate("sinkhorn", scores, bank, epsilon=eps, stop_thr=args.stop_thr, max_iter=args.max_iter,
                      bank_gallery=bank_gallery)
            t_target = time.perf_counter() - start
            print(f"  target bank ({args.n} x {2 * args.n}): {t_target:.3f} s, "
                  f"{t_target / max(t_ours, 1e-9):.1f}x the query-bank solve")
        if args.reference:
            ref, row_err, col_err = reference(bank, eps)
            top_ref = (scores.double() + ref[None, :]).argmax(1)
            print(f"  reference (float64, marginal errors re-checked: rows {row_err:.1e}, columns {col_err:.1e}): "
                  f"max bias diff ours {bias_gap(info.gallery_bias, ref):.4f}, plain "
                  f"{bias_gap(info_plain.gallery_bias, ref):.4f}, naive {bias_gap(naive_bias, ref):.4f}; top-1 agree "
                  f"ours {float((ours.argmax(1) == top_ref).double().mean()):.1%}, plain "
                  f"{float((plain.argmax(1) == top_ref).double().mean()):.1%}")


def bias_gap(bias, ref) -> float:
    """max |bias - ref| after removing the free additive constant (similarity units)."""
    diff = np.asarray(bias, dtype=np.float64) - np.asarray(ref, dtype=np.float64)
    return float(np.abs(diff - diff.mean()).max())


def reference(bank: torch.Tensor, epsilon: float, stop_thr: float = 1e-6):
    """Gallery biases of a float64 solve to ``stop_thr``, and its plan's marginal errors re-summed from the biases."""
    res = sinkhorn_biases(bank.double(), epsilon=epsilon, stop_thr=stop_thr, max_iter=100_000)
    plan = torch.exp((bank.double() + res.bank_bias[:, None] + res.gallery_bias[None, :]) / epsilon)
    rows, cols = plan.sum(1), plan.sum(0)
    row_err = float(torch.linalg.norm(rows - 1 / len(rows)) * len(rows) ** 0.5)
    col_err = float(torch.linalg.norm(cols - 1 / len(cols)) * len(cols) ** 0.5)
    return res.gallery_bias, row_err, col_err

if __name__ == "__main__":
    main()
