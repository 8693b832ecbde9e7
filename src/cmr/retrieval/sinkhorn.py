"""Sinkhorn-Knopp for NCL's instance-wise biases: a fast float32 solver checked against POT.

:func:`sinkhorn_biases` turns a bank's similarities [B, G] into the entropic transport plan
with uniform bank marginal and a chosen gallery marginal, and returns the dual potentials as
additive biases in similarity units. The default solver is an over-relaxed scaling loop in
torch (measured in ``benchmarks/bench_sinkhorn.py``); POT's log-domain solver is the
fallback and the reference the tests compare with.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import torch

from cmr.errors import ConfigError, DataError


@dataclass
class SinkhornResult:
    """Entropic OT between bank queries (rows) and gallery items (columns).

    plan[b, g] = exp((bank[b, g] + bank_bias[b] + gallery_bias[g]) / epsilon); its rows
    sum to the bank marginal (1/B unless weighted) and its columns to the gallery marginal
    (within ``marginal_error``).
    """
    plan: torch.Tensor           # [B, G]
    bank_bias: torch.Tensor      # [B], similarity units
    gallery_bias: torch.Tensor   # [G], similarity units: NCL's instance-wise bias
    n_iter: int
    marginal_error: float        # max of the row and column relative L2 errors of the plan
    method: str                  # "scaling" (with its dtype), "sinkhorn" or "sinkhorn_log"
    omega: float = 1.0           # over-relaxation used in the last iterations (1: plain Sinkhorn-Knopp)


def sinkhorn_biases(bank: torch.Tensor, epsilon: float = 0.01, max_iter: int = 1000,
                    stop_thr: float = 1e-2, gallery_weights: torch.Tensor | None = None,
                    method: str = "auto", omega: float | None = None,
                    bank_weights: torch.Tensor | None = None) -> SinkhornResult:
    """Sinkhorn-Knopp on the bank's similarities at entropic temperature ``epsilon``.

    bank: [B, G] similarities. Row marginal uniform (1/B), or proportional to
    ``bank_weights`` [B] (all > 0); column marginal uniform, or proportional to
    ``gallery_weights`` [G] (all > 0). ``stop_thr`` is the relative L2
    error of the row and of the column marginal at which iterations stop.
    ``method``: "auto" runs :func:`_scaling_sinkhorn` (torch, float32 unless the bank is
    float64, scalings folded into log potentials before they can overflow), falling back
    to POT's log domain if it ever goes non-finite; "sinkhorn" forces POT's plain
    Sinkhorn in float64, "sinkhorn_log" POT's log domain in float64 (checked every 10).
    ``omega`` (method "auto" only): over-relaxation factor in [1, 2); None picks it from
    the measured convergence rate, 1 is plain Sinkhorn-Knopp.
    """
    if epsilon <= 0 or max_iter < 1 or stop_thr <= 0:
        raise ConfigError(f"sinkhorn: need epsilon > 0, max_iter >= 1, stop_thr > 0; got "
                          f"{epsilon}, {max_iter}, {stop_thr}")
    if method not in ("auto", "sinkhorn", "sinkhorn_log"):
        raise ConfigError(f"sinkhorn: unknown method {method!r}; use auto, sinkhorn or sinkhorn_log")
    if omega is not None and not 1.0 <= omega < 2.0:
        raise ConfigError(f"sinkhorn: omega must be in [1, 2) (or null to choose it), got {omega}")
    check_similarities(bank, "bank")
    if method == "auto":
        dtype = torch.float64 if bank.dtype == torch.float64 else torch.float32
        a = _marginal(bank_weights, bank.shape[0], dtype, bank.device, "bank_weights")
        b = _marginal(gallery_weights, bank.shape[1], dtype, bank.device, "gallery_weights")
        result = _scaling_sinkhorn(bank.to(dtype), a, b, epsilon, max_iter, stop_thr, omega)
        if result is None:
            return sinkhorn_biases(bank, epsilon, max_iter, stop_thr, gallery_weights, "sinkhorn_log",
                                   bank_weights=bank_weights)
    else:
        result = _pot_sinkhorn(bank, epsilon, max_iter, stop_thr, gallery_weights, method, bank_weights)
    if result.marginal_error > stop_thr:
        warnings.warn(f"Sinkhorn stopped after {result.n_iter} iterations with marginal "
                      f"error {result.marginal_error:.3g} > stop_thr {stop_thr:g}; raise max_iter or epsilon",
                      stacklevel=2)
    return SinkhornResult(result.plan, result.bank_bias.to(bank.dtype), result.gallery_bias.to(bank.dtype),
                          result.n_iter, result.marginal_error, result.method, result.omega)


# A scaling is folded into its log potential once |log| exceeds this: far from float32's
# overflow (e^88), and rare enough that the kernel is rebuilt only a few times.
_ABSORB_LOG = 30.0
# Range checks cost several small reductions, so they run every 5th iteration; a scaling
# that overflows in between is caught as non-finite.
_CHECK_EVERY = 5
# Rows of the kernel are swept in blocks of about this many bytes, small enough to stay
# in cache between a block's two matrix-vector products: the kernel is then read from
# memory once per iteration instead of twice (each iteration is memory bound).
_BLOCK_BYTES = 4 << 20
# The iterations run on one thread: they are memory bound, so a second thread adds little,
# and on a shared machine every small product then waits for a descheduled thread (at
# load 4 on 2 cores, 5k x 5k at epsilon 0.02: 26 ms an iteration with 2 threads, 10 with 1).
_SWEEP_THREADS = 1
# Over-relaxation (Thibault et al. 2021; Lehmann et al. 2021): plain Sinkhorn runs this many
# iterations, then omega = 2 / (1 + sqrt(1 - rho)) from its measured per-iteration error
# contraction rho (over the last _RATE_WINDOW iterations, capped at _RATE_CAP), the SOR
# optimum for a linear iteration of that rate. On 5k x 5k clustered cosine scores at
# epsilon 0.01 plain Sinkhorn stalls (rho ~ 1): the cap 0.98 (omega 1.75) took 83
# iterations instead of 284; 0.99 (omega 1.82) diverged there and backed off (124), and
# starting after 10 iterations instead of 20 diverged too (benchmarks/README.md).
_OMEGA_START, _RATE_WINDOW, _RATE_CAP = 20, 5, 0.98
# Over-relaxation first lifts the error (at epsilon 0.01 on 5k x 5k, to 6x the best and
# back below it within 15 iterations), so divergence is read as an error above
# _DIVERGED x the best, or no new best for _PATIENCE iterations: the solve then returns
# to the best potentials with omega a quarter of the way back to 1 (with omega capped at
# 1.82 there, halfway back took 173 iterations instead of 124).
_DIVERGED, _PATIENCE, _BACKOFF = 100.0, 50, 0.75


@contextlib.contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(min(old, n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _kernel(bank: torch.Tensor, epsilon: float, f: torch.Tensor, g: torch.Tensor,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """[B, G] exp((bank + f + g) / eps) (f [B], g [G] in similarity units), tiny entries 0.

    Subnormal floats make every matrix-vector product several times slower on CPU. The
    floor, tiny * e^(absorb + 5) (2e-23 in float32), is negligible against any row's mass
    1/B, and with scalings bounded by e^absorb no product can become subnormal.
    """
    kernel = torch.add(bank, g[None, :], out=out).add_(f[:, None]).mul_(1.0 / epsilon).exp_()
    return _floor(kernel)


def _floor(kernel: torch.Tensor) -> torch.Tensor:
    floor = torch.finfo(kernel.dtype).tiny * math.exp(_ABSORB_LOG + 5)
    return torch.nn.functional.threshold_(kernel, floor, 0.0)


def _initial_kernel(bank: torch.Tensor, a: torch.Tensor, epsilon: float):
    """Kernel after the first, exact row update: (kernel [B, G], f [B], g [G]).

    g = minus each column's maximum, so no entry exceeds 1; f makes each row sum to a.
    Built in one buffer: its rows are rescaled in place, except rows whose every entry
    underflowed, whose f comes from a float64 log-sum-exp and which are rebuilt.
    """
    g = -bank.amax(0)
    kernel = torch.add(bank, g[None, :]).mul_(1.0 / epsilon).exp_()
    row_mass = kernel.sum(1)
    f = epsilon * (torch.log(a) - torch.log(row_mass))
    # Below tiny / eps-of-dtype a row's mass may be carried by subnormals and is inexact.
    lost = row_mass < torch.finfo(kernel.dtype).tiny / torch.finfo(kernel.dtype).eps
    if lost.any():
        lse = torch.logsumexp((bank[lost].double() + g[None, :].double()) / epsilon, dim=1)
        f[lost] = (epsilon * (torch.log(a[lost].double()) - lse)).to(f.dtype)
        return _kernel(bank, epsilon, f, g, out=kernel), f, g
    return _floor(kernel.mul_((a / row_mass)[:, None])), f, g


def _sweep(blocks, v: torch.Tensor, ktu: torch.Tensor, omega: float) -> None:
    """Row update u <- u (a / (K v) / u)^omega, block by block, with ktu <- K^T u.

    blocks: (kernel rows, a, u, kv) views of one row block each; u and kv are written
    in place. K^T u is accumulated while each block is still in cache.
    """
    ktu.zero_()
    for k, a_blk, u_blk, kv_blk in blocks:
        torch.mv(k, v, out=kv_blk)
        if omega == 1.0:
            torch.div(a_blk, kv_blk, out=u_blk)
        else:
            u_blk.mul_(torch.div(a_blk, kv_blk).div_(u_blk).pow_(omega))
        ktu.addmv_(k.T, u_blk)


def _scaling_sinkhorn(bank: torch.Tensor, a: torch.Tensor, b: torch.Tensor, epsilon: float, max_iter: int,
                      stop_thr: float, omega: float | None = None) -> SinkhornResult | None:
    """Sinkhorn-Knopp with the kernel built once and read once per iteration.

    bank [B, G], a [B], b [G], all of one dtype. The kernel exp((bank + f + g) / eps)
    carries log potentials f, g (similarity units), so it stays in range at any
    epsilon; scalings u, v that drift past e^30 are folded into f, g and the kernel
    rebuilt in place (Schmitzer's stabilisation). Each iteration updates u then v,
    over-relaxed by omega (None: chosen after _OMEGA_START plain iterations), and
    stops when both marginals are within ``stop_thr``; their errors come from the
    products the updates need anyway. Returns None if a scaling goes non-finite
    without over-relaxation to blame.
    """
    kernel, f, g = _initial_kernel(bank, a, epsilon)
    u, v = torch.ones_like(a), torch.ones_like(b)
    kv, ktu = torch.empty_like(a), torch.empty_like(b)
    rows = max(1, _BLOCK_BYTES // (bank.shape[1] * bank.element_size()))
    blocks = list(zip(kernel.split(rows), a.split(rows), u.split(rows), kv.split(rows)))
    norm_a, norm_b = torch.linalg.norm(a), torch.linalg.norm(b)
    w = 1.0 if omega is None else float(omega)
    errors, n_iter = [], 0
    # The best state so far (lowest error): potentials to return to if over-relaxation diverges.
    best_error, best_f, best_g, best_iter = math.inf, f, g, 0

    def restart(f_new, g_new):
        _kernel(bank, epsilon, f_new, g_new, out=kernel)
        u.fill_(1.0)
        v.fill_(1.0)
        return f_new, g_new

    with _torch_threads(_SWEEP_THREADS):
        while True:
            _sweep(blocks, v, ktu, w)
            col_error = float(torch.linalg.norm(v * ktu - b) / norm_b)
            row_error = 0.0 if w == 1.0 else float(torch.linalg.norm(u * kv - a) / norm_a)
            error = max(col_error, row_error)
            stalled = error > _DIVERGED * best_error or n_iter - best_iter > _PATIENCE
            if not math.isfinite(error) or (w != 1.0 and stalled):
                if w == 1.0:
                    return None
                # Over-relaxed too far: back to the best potentials, with a smaller omega.
                f, g = restart(best_f, best_g)
                best_iter = n_iter
                w = 1.0 + (w - 1.0) * _BACKOFF if w > 1.1 else 1.0
                continue
            if error < best_error:
                best_error, best_iter = error, n_iter
                best_f, best_g = f + epsilon * torch.log(u), g + epsilon * torch.log(v)
            if error <= stop_thr or n_iter == max_iter:
                break
            errors.append(error)
            if omega is None and n_iter == _OMEGA_START:
                rho = min((errors[-1] / errors[-1 - _RATE_WINDOW]) ** (1 / _RATE_WINDOW), _RATE_CAP)
                w = 2.0 / (1.0 + math.sqrt(1.0 - rho))
            v_new = b / ktu
            v.copy_(v_new if w == 1.0 else v * (v_new / v).pow_(w))
            n_iter += 1
            if n_iter % _CHECK_EVERY:
                continue
            log_u, log_v = torch.log(u), torch.log(v)
            if max(float(log_u.abs().max()), float(log_v.abs().max())) > _ABSORB_LOG:
                f, g = restart(f + epsilon * log_u, g + epsilon * log_v)
    plan = kernel.mul_(u[:, None]).mul_(v[None, :])
    return SinkhornResult(plan=plan, bank_bias=f + epsilon * torch.log(u), gallery_bias=g + epsilon * torch.log(v),
                          n_iter=n_iter, marginal_error=error,
                          method=f"scaling/{str(bank.dtype).removeprefix('torch.')}", omega=w)


def _pot_sinkhorn(bank: torch.Tensor, epsilon: float, max_iter: int, stop_thr: float,
                  gallery_weights: torch.Tensor | None, method: str,
                  bank_weights: torch.Tensor | None = None) -> SinkhornResult:
    """POT's ``sinkhorn`` or ``sinkhorn_log`` in float64 (the reference path)."""
    dtype = torch.float64
    n_bank, n_gallery = bank.shape
    # Shifting each column by its max changes only the column scaling (folded back into
    # gallery_bias below) and makes every column's largest kernel entry exactly 1.
    col_max = bank.max(0).values.to(dtype)
    cost = col_max[None, :] - bank.to(dtype)
    a = _marginal(bank_weights, n_bank, dtype, bank.device, "bank_weights")
    b = _marginal(gallery_weights, n_gallery, dtype, bank.device, "gallery_weights")
    import ot  # POT takes seconds to import; `cmr list calibrators` and friends need not wait for it

    with warnings.catch_warnings():
        # POT warns on non-convergence in its own words; the caller measures and warns.
        warnings.simplefilter("ignore", UserWarning)
        plan, log = ot.sinkhorn(a, b, cost, epsilon, method=method, numItermax=max_iter,
                                stopThr=stop_thr * float(torch.linalg.norm(b)), log=True, warn=False)
    if "log_u" in log:
        log_u, log_v = log["log_u"], log["log_v"]
    else:
        log_u, log_v = torch.log(log["u"]), torch.log(log["v"])
    if not (torch.isfinite(log_u).all() and torch.isfinite(log_v).all()):
        if method == "sinkhorn_log":
            raise DataError("bank", "finite Sinkhorn scalings", f"log-domain Sinkhorn diverged at epsilon={epsilon}")
        return _pot_sinkhorn(bank, epsilon, max_iter, stop_thr, gallery_weights, "sinkhorn_log", bank_weights)
    error = max(float(torch.linalg.norm(plan.sum(0) - b) / torch.linalg.norm(b)),
                float(torch.linalg.norm(plan.sum(1) - a) / torch.linalg.norm(a)))
    if method == "sinkhorn" and error > stop_thr:
        # plain Sinkhorn stops early, with finite scalings, once a row's kernel underflows
        return _pot_sinkhorn(bank, epsilon, max_iter, stop_thr, gallery_weights, "sinkhorn_log", bank_weights)
    return SinkhornResult(plan=plan, bank_bias=epsilon * log_u, gallery_bias=epsilon * log_v - col_max,
                          n_iter=int(log["niter"]) + 1, marginal_error=error, method=f"{method}/float64")


def check_similarities(x: torch.Tensor, where: str, rows: int | None = None, cols: int | None = None) -> None:
    """A non-empty [N, M] matrix of finite similarities (with ``rows`` rows and ``cols``
    columns where given), or a DataError naming ``where``."""
    if x.dim() != 2 or 0 in x.shape or (rows is not None and x.shape[0] != rows) or (
            cols is not None and x.shape[1] != cols):
        want = f"[{'N' if rows is None else rows}, {'M' if cols is None else cols}]"
        raise DataError(where, f"a non-empty {want} similarity matrix", f"got shape {tuple(x.shape)}")
    finite = torch.isfinite(x)
    if not finite.all():
        row, col = (int(i) for i in (~finite).nonzero()[0])
        raise DataError(f"{where}[{row}, {col}]", "all similarities finite", f"got {float(x[row, col])}")


def _marginal(weights, n: int, dtype, device, name: str) -> torch.Tensor:
    """Uniform over ``n``, or ``weights`` [n] (finite, > 0) normalised to sum 1."""
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=dtype, device=device)
    weights = torch.as_tensor(weights, dtype=dtype, device=device)
    if weights.shape != (n,) or not (weights > 0).all() or not torch.isfinite(weights).all():
        raise DataError(name, f"{n} finite weights, all > 0",
                        f"got shape {tuple(weights.shape)}, min {float(weights.min()) if weights.numel() else 'n/a'}")
    return weights / weights.sum()
