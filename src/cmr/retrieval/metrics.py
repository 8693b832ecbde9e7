"""Retrieval metrics over a score matrix and an explicit positives matrix.

Ground truth is always a boolean ``positives[Q, G]``: ``positives[q, g]`` is True when
gallery item ``g`` is relevant to query ``q``. Build it with ``positives_instance``
(pairs), ``positives_from_labels`` (shared class label) or ``positives_identity``
(same person / object id), so several captions per image or class-level relevance are
handled by the same code.

Tie rule (pessimistic): a gallery item whose score equals a positive's score is ranked
*above* that positive if it is a negative. A model that gives every item the same score
therefore gets the worst possible rank, never a lucky one. Ties among positives do not
matter (they are interchangeable).
"""
from __future__ import annotations

from typing import Sequence

import torch

from cmr.errors import ConfigError, DataError

DEFAULT_KS = (1, 5, 10)
#: metrics where a smaller value is better (median and mean rank of the first positive)
LOWER_IS_BETTER = ("MdR", "MnR")


def require_higher_is_better(metric: str, setting: str) -> None:
    """ConfigError when ``metric`` (the value of ``setting``) is one where lower is better: the
    callers (best epoch, champion) keep the higher score."""
    if metric.endswith(LOWER_IS_BETTER):
        raise ConfigError(f"{setting} {metric!r}: lower is better there, the higher score is kept; "
                          "choose an R@K, rsum, mAP or mINP")
# Rows per chunk are chosen so one chunk holds about this many (query, gallery) cells;
# the sort of a chunk then needs a few hundred MB at most.
_CELLS_PER_CHUNK = 1 << 22


def positives_instance(query_item: torch.Tensor, n_gallery: int) -> torch.Tensor:
    """Pair-level ground truth: query ``j``'s one positive is gallery item ``query_item[j]``.

    query_item: LongTensor[Q] of gallery indices. Returns BoolTensor[Q, n_gallery].
    For text->image, ``query_item`` maps each caption to its image. For image->text take
    the transpose of the text->image matrix: each image then has all its captions
    (e.g. five) as positives.
    """
    query_item = torch.as_tensor(query_item)
    if query_item.dim() != 1 or query_item.dtype.is_floating_point:
        raise DataError("query_item", "a 1-D integer tensor of gallery indices",
                        f"got dtype {query_item.dtype}, shape {tuple(query_item.shape)}")
    bad = (query_item < 0) | (query_item >= n_gallery)
    if bad.any():
        j = int(bad.nonzero()[0])
        raise DataError(f"query_item[{j}]", f"gallery index in [0, {n_gallery})",
                        f"got {int(query_item[j])}")
    positives = torch.zeros(len(query_item), n_gallery, dtype=torch.bool)
    positives[torch.arange(len(query_item)), query_item.long()] = True
    return positives


def positives_from_labels(q_labels: torch.Tensor, g_labels: torch.Tensor) -> torch.Tensor:
    """Class-level ground truth: relevant when query and item share at least one label.

    q_labels: multi-hot [Q, C]; g_labels: multi-hot [G, C] (bool or 0/1).
    Returns BoolTensor[Q, G].
    """
    q_labels, g_labels = torch.as_tensor(q_labels), torch.as_tensor(g_labels)
    if q_labels.dim() != 2 or g_labels.dim() != 2 or q_labels.shape[1] != g_labels.shape[1]:
        raise DataError("labels", "multi-hot [Q, C] and [G, C] with the same C",
                        f"got {tuple(q_labels.shape)} and {tuple(g_labels.shape)}")
    g = (g_labels != 0).float().T
    q = (q_labels != 0).float()
    step = max(1, _CELLS_PER_CHUNK // max(1, g.shape[1]))
    return torch.cat([(q[i:i + step] @ g) > 0 for i in range(0, len(q), step)]) if len(q) else \
        torch.zeros(0, g.shape[1], dtype=torch.bool)


def positives_identity(q_ids: Sequence | torch.Tensor, g_ids: Sequence | torch.Tensor) -> torch.Tensor:
    """Identity-level ground truth (person re-id, TBPS): relevant when the ids are equal.

    q_ids: [Q] and g_ids: [G], integer tensors or sequences of hashable ids (e.g. str).
    Returns BoolTensor[Q, G].
    """
    if not (isinstance(q_ids, torch.Tensor) and isinstance(g_ids, torch.Tensor)):
        codes: dict = {}
        q_ids = torch.tensor([codes.setdefault(i, len(codes)) for i in q_ids], dtype=torch.long)
        g_ids = torch.tensor([codes.setdefault(i, len(codes)) for i in g_ids], dtype=torch.long)
    return q_ids.reshape(-1, 1) == g_ids.reshape(1, -1)


def _check(scores: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores, positives = torch.as_tensor(scores), torch.as_tensor(positives)
    if scores.dim() != 2 or scores.shape != positives.shape:
        raise DataError("scores/positives", "both [Q, G] with the same shape",
                        f"got {tuple(scores.shape)} and {tuple(positives.shape)}")
    if scores.shape[0] == 0:
        raise DataError("scores", "at least one query", f"got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        row = int((~torch.isfinite(scores)).any(1).nonzero()[0])
        raise DataError(f"scores[{row}]", "all scores finite", "found NaN or inf")
    positives = positives.bool()
    n_pos = positives.sum(1)
    empty = n_pos == 0
    if empty.any():
        raise DataError("positives", "every query has at least one positive in the gallery",
                        f"{int(empty.sum())} of {len(empty)} queries have none "
                        f"(first: query {int(empty.nonzero()[0])})")
    return scores, positives


def _sorted_positive_chunks(scores: torch.Tensor, positives: torch.Tensor, chunk_size: int | None):
    """Yield BoolTensor[q, G]: positives in ranked order, ties broken pessimistically."""
    step = chunk_size or max(1, _CELLS_PER_CHUNK // scores.shape[1])
    for i in range(0, len(scores), step):
        s, p = scores[i:i + step], positives[i:i + step]
        # Negatives first, then a stable descending sort by score: among equal scores the
        # negatives keep their place in front of the positives.
        neg_first = torch.sort(p.to(torch.uint8), dim=1, stable=True).indices
        order = torch.sort(s.gather(1, neg_first), dim=1, descending=True, stable=True).indices
        yield p.gather(1, neg_first.gather(1, order))


def first_positive_ranks(scores: torch.Tensor, positives: torch.Tensor,
                         chunk_size: int | None = None) -> torch.Tensor:
    """LongTensor[Q]: 1-based rank of each query's best-ranked positive (pessimistic ties)."""
    scores, positives = _check(scores, positives)
    return torch.cat([ranked.to(torch.uint8).argmax(1) + 1
                      for ranked in _sorted_positive_chunks(scores, positives, chunk_size)])


def retrieval_metrics(scores: torch.Tensor, positives: torch.Tensor, ks: Sequence[int] = DEFAULT_KS,
                      chunk_size: int | None = None) -> dict[str, float]:
    """Standard retrieval metrics; higher score = more relevant.

    scores: [Q, G] float; positives: [Q, G] bool (every query needs >= 1 positive).
    Returns, as fractions in [0, 1] except the ranks:
      ``R@K``  fraction of queries with at least one positive among the top K
               (the CLIP/COCO convention, not the fraction of positives retrieved);
      ``MdR``, ``MnR``  median and mean 1-based rank of each query's first positive;
      ``mAP``  mean over queries of average precision over *all* the query's positives,
               ranked over the whole gallery;
      ``mINP`` mean inverse negative penalty (Ye et al., person re-id / TBPS):
               n_positives / rank of the hardest (last-ranked) positive.
    Ties are pessimistic (see the module docstring). ``chunk_size`` rows are ranked at a
    time, so a 10k x 10k matrix needs far less memory than its full sort.
    """
    scores, positives = _check(scores, positives)
    first, ap, inp = [], [], []
    for ranked in _sorted_positive_chunks(scores, positives, chunk_size):
        ranks = torch.arange(1, ranked.shape[1] + 1, dtype=torch.float64, device=ranked.device)
        hits = ranked.to(torch.float64)
        n_pos = hits.sum(1)
        precision = hits.cumsum(1) / ranks
        ap.append((precision * hits).sum(1) / n_pos)
        last = ranked.shape[1] - ranked.flip(1).to(torch.uint8).argmax(1)
        inp.append(n_pos / last)
        first.append(ranked.to(torch.uint8).argmax(1) + 1)
    first_rank = torch.cat(first).to(torch.float64)
    out = {f"R@{k}": float((first_rank <= k).double().mean()) for k in ks}
    # torch.median returns the lower middle value; the usual MdR averages the two.
    out["MdR"] = float(first_rank.quantile(0.5))
    out["MnR"] = float(first_rank.mean())
    out["mAP"] = float(torch.cat(ap).mean())
    out["mINP"] = float(torch.cat(inp).mean())
    return out


def recall_curve(scores: torch.Tensor, positives: torch.Tensor, max_k: int,
                 chunk_size: int | None = None) -> list[float]:
    """[R@1, R@2, ..., R@max_k] with the R@K definition of ``retrieval_metrics``."""
    first = first_positive_ranks(scores, positives, chunk_size)
    counts = torch.bincount(first.clamp(max=max_k + 1), minlength=max_k + 2)[1:max_k + 1]
    return (counts.cumsum(0).double() / len(first)).tolist()
