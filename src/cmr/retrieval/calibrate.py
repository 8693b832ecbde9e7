"""Test-time score calibrators: NCL's Sinkhorn biases and the querybank methods it competes with.

Every calibrator is ``fn(scores[Q, G], bank[B, G] | None, **options) -> Tensor[Q, G]``
(higher = better). ``bank`` holds the similarities of a QUERY BANK (training or
validation queries of the same modality as the test queries) to the *test gallery*.
Using the test queries themselves as the bank is the transductive setting: it leaks
the test-query distribution, so ``calibrate`` allows it only when asked
(``transductive=True``) and labels the metric names with ``@transductive``.

Calibrated scores rank the gallery for each query; they are not comparable across
queries (``qbnorm`` normalises some rows and not others, as the paper does).

None of these methods assumes one positive per query. What ``sinkhorn`` does assume is a
*gallery marginal*: every gallery item should attract the same share of the bank's
retrieval mass (uniform by default), or the share given by ``gallery_weights`` (e.g. the
number of captions per image when images are retrieved, or class frequencies).

A bank drawn from training queries has its true matches in the *training* gallery, not in
the test gallery it is scored against, so plain Sinkhorn forces every bank query to spend
all its mass on items it does not match. ``sinkhorn``'s ``bank_gallery`` option adds the
bank's own gallery as extra columns of the transport problem (the "target bank" of Dual
Bank Sinkhorn Normalization, Pan et al., ACM MM 2025); only the test gallery's biases are
returned.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from cmr.errors import ConfigError, DataError
from cmr.registry import Registry, nearest
from cmr.retrieval.sinkhorn import check_similarities, sinkhorn_biases

CALIBRATORS: Registry[Callable[..., torch.Tensor]] = Registry("calibrator")

TRANSDUCTIVE_SUFFIX = "@transductive"

def _calibrator(name: str, needs_bank: bool):
    def decorator(fn):
        fn.needs_bank = needs_bank
        return CALIBRATORS.register(name)(fn)
    return decorator


def calibrate(name: str, scores: torch.Tensor, bank: torch.Tensor | None = None,
              transductive: bool = False, **options) -> tuple[torch.Tensor, str]:
    """Apply calibrator ``name``; return (calibrated scores [Q, G], metric-name suffix).

    The suffix is ``""`` for the inductive setting (bank from training/validation
    queries, or no bank needed) and ``"@transductive"`` when the test scores serve as
    their own bank; append it to every metric name computed from these scores.
    """
    fn = CALIBRATORS.get(name)
    allowed = [p for p in inspect.signature(fn).parameters if p not in ("scores", "bank")]
    for key in options:
        if key not in allowed:
            raise ConfigError(f"calibrator {name!r}: unknown option {key!r}{nearest(key, allowed)}; "
                              f"options: {', '.join(allowed) or 'none'}")
    scores = torch.as_tensor(scores)
    check_similarities(scores, "scores")
    suffix = ""
    if transductive:
        if bank is not None:
            raise ConfigError(f"calibrator {name!r}: transductive=True uses the test scores as the "
                              "bank; pass bank=None or transductive=False")
        if fn.needs_bank:
            bank, suffix = scores, TRANSDUCTIVE_SUFFIX
    elif fn.needs_bank and bank is None:
        raise ConfigError(f"calibrator {name!r} needs a query bank (similarities of training or "
                          "validation queries to the test gallery); pass bank=..., or "
                          "transductive=True to use the test queries (reported as @transductive)")
    if bank is not None:
        bank = torch.as_tensor(bank)
        check_similarities(bank, "bank", cols=scores.shape[1])  # the test gallery's items
    for key in ("temperature", "beta", "epsilon"):
        if key in options and not options[key] > 0:
            raise ConfigError(f"calibrator {name!r}: {key} must be > 0, got {options[key]!r}")
    return fn(scores, bank, **options), suffix


@_calibrator("none", needs_bank=False)
def no_calibration(scores: torch.Tensor, bank: torch.Tensor | None = None) -> torch.Tensor:
    """The raw similarities."""
    return scores


@_calibrator("sinkhorn", needs_bank=True)
def sinkhorn(scores: torch.Tensor, bank: torch.Tensor, epsilon: float = 0.01, max_iter: int = 1000,
             stop_thr: float = 1e-2, gallery_weights: torch.Tensor | None = None,
             method: str = "auto", omega: float | None = None, bank_gallery: torch.Tensor | None = None,
             bank_gallery_weights: torch.Tensor | None = None,
             bank_weights: torch.Tensor | None = None) -> torch.Tensor:
    """NCL: add each gallery item's Sinkhorn bias, computed on the bank, to the test scores.

    Default epsilon 0.01 is CLIP's softmax temperature (logit scale 100): the biases
    normalise the model's own retrieval probabilities, so pass 1 / logit_scale of the
    model being evaluated. With stop_thr 1e-2 the biases were within 0.021 (similarity
    units) of a float64 solve to 1e-6 on clustered 5k x 5k data at epsilon 0.01 and 0.02,
    keeping 97.3 % / 99.96 % of its top-1 choices (benchmarks/README.md); lower stop_thr
    where top-1 stability matters more than time. ``omega``: see :func:`sinkhorn_biases`.

    ``bank_gallery`` [B, G2]: the same bank queries scored against their own gallery (the
    items they were drawn with), appended as G2 extra columns with marginal
    ``bank_gallery_weights`` [G2] (ones by default) beside ``gallery_weights`` (ones by
    default): the two are on one scale, so give both as expected query counts. Only the
    G test-gallery biases are added to ``scores``.

    ``bank_weights`` [B] (>= 0): the row marginal, each bank query's share of the retrieval
    mass (uniform by default). When queries have several positives (an image retrieving
    its texts) a query asks for as many gallery items as it has positives, so its weight is
    that count (:func:`bank_positive_counts`); a query of weight 0 asks for nothing and
    leaves the problem.
    """
    weights = gallery_weights
    if bank_gallery is not None:
        bank_gallery = torch.as_tensor(bank_gallery)
        check_similarities(bank_gallery, "bank_gallery", rows=bank.shape[0])  # the same bank queries
        n_extra = bank_gallery.shape[1]
        if bank_gallery_weights is not None:
            bank_gallery_weights = torch.as_tensor(bank_gallery_weights)
        if bank_gallery_weights is not None and tuple(bank_gallery_weights.shape) != (n_extra,):
            raise DataError("bank_gallery_weights", f"one weight per bank-gallery item ({n_extra})",
                            f"got shape {tuple(bank_gallery_weights.shape)}")
        weights = torch.cat([_weights_or_ones(gallery_weights, bank.shape[1]),
                             _weights_or_ones(bank_gallery_weights, n_extra)])
        bank = torch.cat([bank, bank_gallery.to(bank.dtype)], dim=1)
    elif bank_gallery_weights is not None:
        raise ConfigError("sinkhorn: bank_gallery_weights given without bank_gallery")
    if bank_weights is not None:
        bank_weights = torch.as_tensor(bank_weights, dtype=torch.float64)
        if (tuple(bank_weights.shape) != (bank.shape[0],) or not torch.isfinite(bank_weights).all()
                or (bank_weights < 0).any() or not (bank_weights > 0).any()):
            raise DataError("bank_weights", f"{bank.shape[0]} finite weights >= 0, not all 0 (one per bank query)",
                            f"got shape {tuple(bank_weights.shape)}, min "
                            f"{float(bank_weights.min()) if bank_weights.numel() else 'n/a'}")
        asks = bank_weights > 0
        bank, bank_weights = bank[asks], bank_weights[asks]
    result = sinkhorn_biases(bank, epsilon, max_iter, stop_thr, weights, method, omega, bank_weights)
    return scores + result.gallery_bias[: scores.shape[1]].to(scores.dtype)[None, :]


def _weights_or_ones(weights: torch.Tensor | None, n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.float64) if weights is None else torch.as_tensor(weights).double()


def _bank_log_normaliser(bank: torch.Tensor, inverse_temperature: float) -> torch.Tensor:
    """[G]: log sum_b exp(inverse_temperature * bank[b, g])."""
    return torch.logsumexp(inverse_temperature * bank.double(), dim=0)


@_calibrator("inverted_softmax", needs_bank=True)
def inverted_softmax(scores: torch.Tensor, bank: torch.Tensor, beta: float = 20.0) -> torch.Tensor:
    """Inverted softmax: exp(beta s[q, g]) / sum_b exp(beta bank[b, g]), returned as its log.

    beta 20 is QB-Norm's default inverse temperature for cosine similarities.
    """
    return (beta * scores.double() - _bank_log_normaliser(bank, beta)[None, :]).to(scores.dtype)


@_calibrator("qbnorm", needs_bank=True)
def qbnorm(scores: torch.Tensor, bank: torch.Tensor, beta: float = 20.0, k: int = 1) -> torch.Tensor:
    """QB-Norm with the dynamic inverted softmax (Bogolin et al., CVPR 2022).

    Activation set A: gallery items in the top-``k`` of at least one bank query. A test
    query whose raw top-1 item lies in A (it is heading for a possible hub) gets the
    inverted-softmax row (as log); any other query keeps its raw scores. beta 20 and
    k 1 are the paper's defaults.
    """
    if k < 1:
        raise ConfigError(f"qbnorm: k must be >= 1, got {k}")
    active = torch.zeros(bank.shape[1], dtype=torch.bool, device=bank.device)
    active[bank.topk(min(k, bank.shape[1]), dim=1).indices.reshape(-1)] = True
    normalise = active[scores.argmax(1)]
    out = scores.clone()
    out[normalise] = inverted_softmax(scores[normalise], bank, beta)
    return out


@_calibrator("dsl", needs_bank=True)
def dual_softmax(scores: torch.Tensor, bank: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Dual softmax (DSL, Cheng et al. 2021) with a query bank: s * softmax over queries.

    The softmax over the query axis is normalised by the bank:
    prior[q, g] = exp(s[q, g] / T) / sum_b exp(bank[b, g] / T). With the test scores as
    bank this is the original (transductive) DSL. T 0.01 matches CLIP's logit scale.
    Computed in float64 and divided per row by a constant (which keeps each row's
    ranking) so nothing overflows; the result is float64.
    """
    log_prior = scores.double() / temperature - _bank_log_normaliser(bank, 1.0 / temperature)[None, :]
    log_prior = log_prior - log_prior.max(1, keepdim=True).values
    return scores.double() * torch.exp(log_prior)


# ---------------------------------------------------------------- choosing options on validation

#: Option grids tried when the user gives none. One scale for every method, as
#: temperatures 0.01..0.2 (inverse temperatures 100..5): the right one depends on the
#: spread of the model's scores (CLIP's logit scale is 100; a head trained here settled
#: near 15), so it is chosen on validation rather than assumed.
DEFAULT_GRIDS: dict[str, dict[str, list]] = {
    "none": {},
    "sinkhorn": {"epsilon": [0.01, 0.02, 0.05, 0.1, 0.2]},
    "dsl": {"temperature": [0.01, 0.02, 0.05, 0.1, 0.2]},
    "qbnorm": {"beta": [5.0, 10.0, 20.0, 50.0, 100.0]},
    "inverted_softmax": {"beta": [5.0, 10.0, 20.0, 50.0, 100.0]},
}


#: training neighbours whose text counts estimate a gallery image's (fixed, not tuned)
MARGINAL_NEIGHBOURS = 5


def expected_texts_per_image(train_image: torch.Tensor, train_text_item: torch.Tensor,
                             gallery_image: torch.Tensor, k: int = MARGINAL_NEIGHBOURS) -> torch.Tensor:
    """[G] estimated number of texts per gallery image, from training data only.

    train_image [N, D] and gallery_image [G, D] L2-normalised; train_text_item [T] the
    image of each training text. Each gallery image gets the mean text count of its
    ``k`` most similar training images. How often an image will be asked for is a
    property of the test queries, which the inductive setting must not read; this is
    Sinkhorn's text->image gallery marginal when images have several texts.
    """
    counts = torch.bincount(train_text_item, minlength=train_image.shape[0]).to(torch.float64)
    nearest = (gallery_image @ train_image.T).topk(min(k, train_image.shape[0]), dim=1).indices
    return counts[nearest].mean(dim=1).clamp(min=1.0)


def bank_own_gallery(direction: str, bank_rows: torch.Tensor, text_item: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The bank queries' own gallery: (rows of the bank split's gallery modality, weights).

    ``bank_rows`` index the bank queries in their split (texts for ``t2i``, images for
    ``i2t``); ``text_item`` [T] is that split's image of each text. t2i: the images that
    own at least one bank text, each weighted by how many of the bank's texts it owns;
    i2t: every text of a bank image, weight 1 (a text has one image). The weights count
    bank queries, the scale of an estimated :func:`expected_texts_per_image`.
    """
    if direction == "t2i":
        rows, counts = torch.unique(text_item[bank_rows], return_counts=True)
        return rows, counts.to(torch.float64)
    if direction == "i2t":
        rows = torch.nonzero(torch.isin(text_item, bank_rows)).flatten()
        return rows, torch.ones(len(rows), dtype=torch.float64)
    raise ConfigError(f"unknown direction {direction!r}; use t2i or i2t")


def bank_positive_counts(direction: str, bank_rows: torch.Tensor, text_item: torch.Tensor,
                         n_images: int) -> torch.Tensor:
    """[B] how many gallery items each bank query asks for: its number of positives.

    t2i: 1 per bank text (a text has one image); i2t: the number of texts each bank image
    owns in its split (0 for an image without texts). Sinkhorn's row marginal
    (``bank_weights``), so that rows and columns both count relevant (query, item) pairs.
    """
    if direction == "t2i":
        return torch.ones(len(bank_rows), dtype=torch.float64)
    if direction == "i2t":
        return torch.bincount(text_item, minlength=n_images).to(torch.float64)[bank_rows]
    raise ConfigError(f"unknown direction {direction!r}; use t2i or i2t")


def option_grid(name: str, options: dict | None = None) -> list[dict]:
    """Every option set to try for calibrator ``name``.

    A list value is a set of alternatives, a scalar a fixed option; the grid is their
    Cartesian product. Options not given take their grid from ``DEFAULT_GRIDS``.
    """
    CALIBRATORS.get(name)
    axes = {k: list(v) for k, v in DEFAULT_GRIDS.get(name, {}).items()}
    for key, value in (options or {}).items():
        axes[key] = list(value) if isinstance(value, (list, tuple)) else [value]
        if not axes[key]:
            raise ConfigError(f"calibrator {name!r}: option {key!r} has an empty list of values")
    grid = [{}]
    for key, values in axes.items():
        grid = [{**g, key: v} for g in grid for v in values]
    return grid


@dataclass
class Selection:
    """The calibration chosen on validation, and what every candidate scored there."""
    method: str
    options: dict
    score: float                 # sum of R@K (percent) on validation
    candidates: list[dict]       # [{"method", "options", "score"}], in the order tried


def select_calibration(name: str, scores: torch.Tensor, bank: torch.Tensor | None, positives: torch.Tensor,
                       options: dict | None = None, ks: tuple[int, ...] = (1, 5, 10),
                       transductive: bool = False, fixed: dict | None = None) -> Selection:
    """Choose between no calibration and calibrator ``name`` over its option grid.

    scores: [Q, G] validation queries against the validation gallery; bank: [B, G] the
    query bank against the same gallery; positives: [Q, G] bool (queries without a
    positive are not scored, but stay in a transductive bank, as at test time). The
    criterion is the sum of R@K in percent. ``none`` is tried first and a later
    candidate must beat the best so far strictly, so the choice never scores below
    ``none`` on validation. ``fixed`` options follow from the data
    rather than being chosen (Sinkhorn's ``gallery_weights`` for this gallery): passed
    to calibrator ``name``, not recorded in the selection.
    """
    from cmr.retrieval.metrics import retrieval_metrics

    keep = positives.any(dim=1)
    tried = [("none", {})] + ([] if name == "none" else [(name, o) for o in option_grid(name, options)])
    rows, best = [], None
    for method, opts in tried:
        extra = (fixed or {}) if method == name else {}
        out, _ = calibrate(method, scores, bank, transductive=transductive, **opts, **extra)
        metrics = retrieval_metrics(out[keep], positives[keep], ks=tuple(ks))
        score = 100.0 * sum(metrics[f"R@{k}"] for k in ks)
        rows.append({"method": method, "options": opts, "score": score})
        if best is None or score > best["score"]:
            best = rows[-1]
    return Selection(best["method"], best["options"], best["score"], rows)
