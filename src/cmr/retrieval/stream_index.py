"""Build a FAISS index from a gallery that arrives in pieces (shards), holding one piece at a time.

:func:`build_index_streamed` is :func:`cmr.retrieval.index.build_index` for an iterable of
row blocks: an index that needs training (ivf, ivfpq) is trained on a sample of the first
blocks (the first ``train_rows`` rows or more, as many blocks as that takes), then every
block is added as it comes. Exact search ("flat") gives the same index as one ``add`` of the
whole array. The recall against exact search is measured on the way: the exact top k of the
given queries is merged block by block (``faiss.ResultHeap``), so the gallery is never whole.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import faiss
import numpy as np

from cmr.errors import DataError
from cmr.retrieval.index import Index, _as_matrix, _overlap, new_index


def build_index_streamed(kind: str, blocks: Iterable, ids: Sequence[str], dim: int, device: str = "auto", *,
                         recall_queries=None, recall_k: int = 10, seed: int = 0, **options) -> Index:
    """An index of ``kind`` over the rows of ``blocks`` (each float32 [n_i, dim], in row
    order, sum n_i = len(ids)); ``ids`` one per row, known up front (the list of lengths
    sizes the index: nlist, training sample).

    ``recall_queries`` float32 [Q, dim] (already sampled: all Q are used) measures the
    recall@``recall_k`` of an approximate index against exact search into
    ``Index.build_stats``; None skips it. ``seed`` draws the training sample.
    """
    count = len(ids)
    spec, index, search = new_index(kind, dim, ids, count, device, 1, recall_k, options)
    rows = spec.train_rows(count, index.build_options, index.faiss_index) if spec.train_rows else count
    queries = None
    if recall_queries is not None and not spec.exact:
        queries = _as_matrix(recall_queries, "recall_queries", dim)
        k = min(recall_k, count)
        truth = faiss.ResultHeap(len(queries), k, keep_max=True)  # inner product: keep the largest
    rng, pending, added, pool = np.random.default_rng(seed), [], 0, 0
    for number, block in enumerate(blocks):
        x = _as_matrix(block, f"embeddings block {number}", dim)
        if queries is not None and len(x):
            scores, found = faiss.knn(queries, x, min(k, len(x)), metric=faiss.METRIC_INNER_PRODUCT)
            truth.add_result(scores, np.where(found >= 0, found + added, -1))
        added += len(x)
        if index.faiss_index.is_trained:
            index.faiss_index.add(x)
            continue
        pending.append(x)  # untrained: keep the first blocks until they hold the training sample
        if sum(map(len, pending)) >= rows:
            pool, pending = _train_and_add(index, pending, rows, rng), []
    if pending:
        pool = _train_and_add(index, pending, rows, rng)
    if added != count:
        raise DataError("embeddings blocks", f"{count} rows, one per id", f"the blocks held {added}")
    index.tune(**search)
    if queries is not None:
        truth.finalize()
        index.build_stats = {f"recall_at_{k}": _overlap(index.search(queries, k)[1], truth.I),
                             "recall_queries": len(queries), "recall_query_source": "given queries",
                             "recall_search_options": dict(index.search_options),
                             **({"train_pool_rows": pool} if pool else {})}
    return index


def _train_and_add(index: Index, pending: list[np.ndarray], rows: int, rng: np.random.Generator) -> int:
    """Train ``index`` on ``rows`` rows sampled from the held blocks (all when fewer), then add
    them; returns how many rows the sample was drawn from."""
    x = np.concatenate(pending) if len(pending) > 1 else pending[0]
    if not index.faiss_index.is_trained:
        index.faiss_index.train(x if rows >= len(x) else x[np.sort(rng.choice(len(x), rows, replace=False))])
    index.faiss_index.add(x)
    return len(x)
