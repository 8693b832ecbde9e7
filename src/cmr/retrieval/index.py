"""FAISS indexes over L2-normalised embeddings (inner product = cosine similarity).

``build_index(kind, embeddings, ids)`` picks a kind from ``INDEXES`` ("flat" exact,
"ivf" IVFFlat, "ivfpq" IVF with product-quantised codes, "hnsw"); ``Index.save(dir)``
writes ``index.faiss``, ``ids.json`` and ``meta.json`` atomically (plus ``lists.ivfdata``
for inverted lists kept on disk); ``load_index(dir)`` checks them against each other.
An approximate index carries its recall@k against exact search, measured when it was
built (``Index.build_stats``, saved in ``meta.json``).
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import faiss
import numpy as np

from cmr.errors import ConfigError, DataError
from cmr.io import atomic_path, read_json, write_json
from cmr.progress import progress_chunks
from cmr.registry import Registry, nearest
from cmr.retrieval import ivfpq

METRIC = "inner_product"
INDEX_FILE, IDS_FILE, META_FILE, LISTS_FILE = "index.faiss", "ids.json", "meta.json", ivfpq.LISTS_FILE


@dataclass(frozen=True)
class IndexKind:
    """How to make an empty index of one kind, and how to set its search-time knobs.

    make(dim, count, **build_options) -> faiss.Index (untrained, empty);
    tune(index, **search_options) sets e.g. nprobe; defaults hold each option's default;
    classes: the FAISS classes ``make`` can return, checked when an index is loaded.
    """
    make: Callable[..., faiss.Index]
    classes: tuple[type, ...]
    build_defaults: dict[str, Any]
    search_defaults: dict[str, Any] = field(default_factory=dict)
    tune: Callable[..., None] | None = None
    gpu: bool = True  # FAISS has GPU versions of flat and IVF, not of HNSW
    exact: bool = False  # flat: no recall to measure
    train_rows: Callable[[int, dict, faiss.Index], int] | None = None  # rows to train on (a sample); default all


INDEXES: Registry[IndexKind] = Registry("index")


# FAISS scores queries against the database in blocks of 1,024 rows by default; on two
# cores that made a 1k x 100k x 512 flat search ~1.6x slower than one torch matmul, and
# 16,384-row blocks made it as fast or faster (benchmarks/bench_index.py).
_BLAS_DATABASE_BLOCK = 16384

# Vectors are added this many at a time, so a large build shows rows done and time left
# (adding is what grows with the gallery: HNSW links, IVF assignment, PQ encoding). Every
# kind numbers the rows in the order they come, so the chunks give the index of one add;
# HNSW links each chunk's vectors by level within the chunk, as any incremental add does.
ADD_CHUNK = 16384


@contextlib.contextmanager
def _large_blas_blocks():
    old = faiss.cvar.distance_compute_blas_database_bs
    faiss.cvar.distance_compute_blas_database_bs = max(old, _BLAS_DATABASE_BLOCK)
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_database_bs = old


def _whole(value, low: int) -> bool:
    """``value`` is an integer (not a bool) >= ``low``."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low


def _ivf_nlist(count: int, nlist: int | None) -> int:
    # ~4 sqrt(N) lists is FAISS's usual starting point; k-means wants >= 39 points a list.
    if nlist is None:
        return max(1, min(int(4 * math.sqrt(count)), count // 39))
    if not _whole(nlist, 1):
        raise ConfigError(f"index 'ivf': nlist must be a whole number >= 1 (or null to choose it), got {nlist!r}")
    return nlist


def _set_nprobe(index, nprobe: int) -> None:
    index.nprobe = int(nprobe)


def _set_ef_search(index, ef_search: int) -> None:
    index.hnsw.efSearch = int(ef_search)


INDEXES.register("flat")(IndexKind(make=lambda dim, count: faiss.IndexFlatIP(dim), classes=(faiss.IndexFlatIP,),
                                   build_defaults={}, exact=True))
INDEXES.register("ivf")(IndexKind(
    make=lambda dim, count, nlist=None: faiss.IndexIVFFlat(
        faiss.IndexFlatIP(dim), dim, _ivf_nlist(count, nlist), faiss.METRIC_INNER_PRODUCT),
    classes=(faiss.IndexIVFFlat,),
    # On clustered 100k x 512 data (benchmarks/bench_index.py, 1,264 lists) nprobe 32 gave
    # recall@10 1.00 at noise 2.0 but 0.91 at noise 2.5: tune it on your own embeddings.
    build_defaults={"nlist": None}, search_defaults={"nprobe": 32}, tune=_set_nprobe))
INDEXES.register("hnsw")(IndexKind(
    make=lambda dim, count, M=32, ef_construction=64, storage="flat": _hnsw(dim, M, ef_construction, storage),
    classes=(faiss.IndexHNSWFlat, faiss.IndexHNSWSQ),
    # ef_search 64: recall@10 0.997 at noise 2.0, 0.89 at noise 2.5 (same benchmark).
    build_defaults={"M": 32, "ef_construction": 64, "storage": "flat"}, search_defaults={"ef_search": 64},
    tune=_set_ef_search, gpu=False))

INDEXES.register("ivfpq")(IndexKind(
    make=lambda dim, count, **build: ivfpq.make(dim, count, _ivf_nlist, **build),
    classes=(faiss.IndexIVFPQ,),
    build_defaults={"nlist": None, "m": None, "nbits": 8, "train_size": None, "on_disk": False},
    # nprobe 16: recall@10 is bounded by the codes' distortion more than by the lists probed
    # (benchmarks/bench_scale.py); the recall measured at build time is in meta.json.
    search_defaults={"nprobe": 16}, tune=_set_nprobe, gpu=False, train_rows=ivfpq.train_rows))

# How HNSW stores the vectors it compares during the graph walk: "flat" float32 (exact
# scores), or FAISS scalar quantisers "sq8" (8 bits a dimension, a quarter of the memory
# traffic per comparison, scores approximate) and "fp16".
_HNSW_STORAGE = {"sq8": "QT_8bit", "fp16": "QT_fp16"}


def _hnsw(dim: int, M: int, ef_construction: int, storage: str = "flat") -> faiss.Index:
    if storage == "flat":
        index = faiss.IndexHNSWFlat(dim, int(M), faiss.METRIC_INNER_PRODUCT)
    elif storage in _HNSW_STORAGE:
        quantiser = getattr(faiss.ScalarQuantizer, _HNSW_STORAGE[storage])
        index = faiss.IndexHNSWSQ(dim, quantiser, int(M), faiss.METRIC_INNER_PRODUCT)
    else:
        raise ConfigError(f"index 'hnsw': storage must be one of flat, {', '.join(_HNSW_STORAGE)}; got {storage!r}")
    index.hnsw.efConstruction = int(ef_construction)
    return index


def _as_matrix(x, where: str, dim: int | None = None) -> np.ndarray:
    """float32 C-contiguous [N, D] array from a numpy array or torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise DataError(where, f"a float matrix [N, {dim if dim is not None else 'D'}]", f"got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DataError(f"{where}[{int(np.nonzero(~np.isfinite(x).all(1))[0][0])}]", "all values finite",
                        "found NaN or inf")
    return x


# Whole-number options and their smallest valid value (FAISS does not check them: an HNSW
# graph with M -1 asks for memory until the process is killed).
_MINIMUM = {"nprobe": 1, "M": 2, "ef_construction": 1, "ef_search": 1, "nbits": 1}


def _check_counts(name: str, options: dict) -> None:
    for key, low in _MINIMUM.items():
        value = options.get(key, low)
        if not _whole(value, low):
            raise ConfigError(f"index {name!r}: {key} must be a whole number >= {low}, got {value!r}")


def _split_options(kind: IndexKind, name: str, options: dict) -> tuple[dict, dict]:
    known = {**kind.build_defaults, **kind.search_defaults}
    for key in options:
        if key not in known:
            raise ConfigError(f"index {name!r}: unknown option {key!r}{nearest(key, known)}; "
                              f"options: {', '.join(known) or 'none'}")
    _check_counts(name, options)
    build = {k: options.get(k, v) for k, v in kind.build_defaults.items()}
    search = {k: options.get(k, v) for k, v in kind.search_defaults.items()}
    return build, search


def _use_gpu(kind: IndexKind, name: str, device: str) -> bool:
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"index device must be auto, cpu or cuda, got {device!r}")
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "cuda" and (gpus == 0 or not kind.gpu):
        raise ConfigError(f"index {name!r} on cuda: " + ("FAISS sees no GPU (install faiss-gpu, "
                          "not faiss-cpu)" if gpus == 0 else "FAISS has no GPU version of it"))
    return device != "cpu" and gpus > 0 and kind.gpu


class Index:
    """A FAISS index plus the string id of every row; scores are inner products."""

    def __init__(self, faiss_index: faiss.Index, ids: list[str], kind: str,
                 build_options: dict, search_options: dict):
        self.faiss_index, self.ids, self.kind = faiss_index, ids, kind
        self.build_options, self.search_options = dict(build_options), {}
        self.build_stats: dict = {}  # e.g. recall_at_10 against exact search, measured by build_index
        self._gpu_resources = None
        self.tune(**search_options)

    @property
    def dim(self) -> int:
        return self.faiss_index.d

    @property
    def count(self) -> int:
        return self.faiss_index.ntotal

    def tune(self, **search_options) -> "Index":
        """Set search-time options (``nprobe`` for ivf, ``ef_search`` for hnsw)."""
        kind = INDEXES.get(self.kind)
        for key in search_options:
            if key not in kind.search_defaults:
                raise ConfigError(f"index {self.kind!r}: unknown search option {key!r}; "
                                  f"options: {', '.join(kind.search_defaults) or 'none'}")
        _check_counts(self.kind, search_options)
        if search_options:
            kind.tune(self.faiss_index, **search_options)
            self.search_options.update(search_options)
        return self

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows for each query: (scores float32[Q, k], rows int64[Q, k]).

        queries: [Q, D] numpy or torch. A row of -1 (score -inf) means fewer than k
        items were found (possible with a small nprobe).
        """
        if not _whole(k, 1):
            raise ConfigError(f"index search: k must be a whole number >= 1, got {k!r}")
        queries = _as_matrix(queries, "queries", self.dim)
        with _large_blas_blocks():
            scores, rows = self.faiss_index.search(queries, int(min(k, self.count)))
        scores[rows < 0] = -np.inf
        return scores, rows

    def search_ids(self, queries, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Like ``search`` but with the items' string ids (missing results left out)."""
        scores, rows = self.search(queries, k)
        return scores, [[self.ids[r] for r in row if r >= 0] for row in rows.tolist()]

    def save(self, directory: str | Path) -> Path:
        """Write index.faiss, ids.json and meta.json into ``directory`` atomically."""
        index = self.faiss_index
        if self._gpu_resources is not None:
            index = faiss.index_gpu_to_cpu(index)
        meta = {"kind": self.kind, "dim": self.dim, "count": self.count, "metric": METRIC,
                "build_options": self.build_options, "search_options": self.search_options,
                "build_stats": self.build_stats, "faiss_version": faiss.__version__}
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            if self.build_options.get("on_disk"):
                # index.faiss names the lists file; load_index reads it from the index's own folder
                with ivfpq.lists_on_disk(index, tmp / LISTS_FILE):
                    faiss.write_index(index, str(tmp / INDEX_FILE))
            else:
                faiss.write_index(index, str(tmp / INDEX_FILE))
            (tmp / IDS_FILE).write_text(json.dumps(self.ids), encoding="utf-8")
            write_json(tmp / META_FILE, meta)
        return Path(directory)

    def _to_gpu(self) -> None:
        self._gpu_resources = faiss.StandardGpuResources()
        self.faiss_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self.faiss_index)


def build_index(kind: str, embeddings, ids: Sequence[str], device: str = "auto", *, recall_queries=None,
                recall_sample: int = 1000, recall_k: int = 10, seed: int = 0, label: str = "", **options) -> Index:
    """Build an index of ``kind`` over embeddings float32[N, D] (L2-normalise them first).

    ids: N unique strings, one per row. device: "auto" (GPU when FAISS sees one and the
    kind has a GPU version), "cpu" or "cuda". options: see ``INDEXES.get(kind)``
    (ivf: nlist, nprobe; ivfpq: nlist, m, nbits, train_size, on_disk, nprobe; hnsw: M,
    ef_construction, storage, ef_search).
    An approximate index then measures its recall@``recall_k`` against exact search for
    ``recall_sample`` queries sampled (``seed``) from ``recall_queries`` float32[Q, D], or
    from the gallery rows when none are given (each row then finds itself at rank 1),
    into ``Index.build_stats``; ``recall_sample`` 0 skips it. ``label`` names the progress
    bar of the add (e.g. "images").
    """
    x = _as_matrix(embeddings, "embeddings")
    spec, index, search = new_index(kind, x.shape[1], ids, len(x), device, recall_sample, recall_k, options)
    pool = x if recall_queries is None else _as_matrix(recall_queries, "recall_queries", x.shape[1])
    rng = np.random.default_rng(seed)
    rows = spec.train_rows(len(x), index.build_options, index.faiss_index) if spec.train_rows else len(x)
    if not index.faiss_index.is_trained:
        index.faiss_index.train(x if rows >= len(x) else x[np.sort(rng.choice(len(x), rows, replace=False))])
    desc = f"{label + ': ' if label else ''}adding to the {kind} index"
    for start, stop in progress_chunks(len(x), ADD_CHUNK, desc, unit="vector"):
        index.faiss_index.add(x[start:stop])
    index.tune(**search)
    if not spec.exact and recall_sample:
        queries = pool[np.sort(rng.choice(len(pool), min(recall_sample, len(pool)), replace=False))]
        k = min(recall_k, len(x))
        _, truth = faiss.knn(queries, x, k, metric=faiss.METRIC_INNER_PRODUCT)
        index.build_stats = {f"recall_at_{k}": _overlap(index.search(queries, k)[1], truth),
                             "recall_queries": len(queries),
                             "recall_query_source": "gallery rows" if recall_queries is None else "given queries",
                             "recall_search_options": dict(index.search_options)}
    return index


def new_index(kind: str, dim: int, ids: Sequence[str], count: int, device: str, recall_sample: int, recall_k: int,
              options: dict) -> tuple[IndexKind, Index, dict]:
    """(kind spec, empty untrained Index on its device, search options) for ``count`` rows of
    ``dim``, after checking the options, the ids and the recall settings."""
    spec = INDEXES.get(kind)
    build, search = _split_options(spec, kind, options)
    if count == 0:
        raise DataError("embeddings", "at least one row to index", f"got shape (0, {dim})")
    ids = [str(i) for i in ids]
    if len(ids) != count:
        raise DataError("ids", "one id per embedding row", f"{len(ids)} ids for {count} rows")
    _check_unique(ids, "ids")
    if "nlist" in build and count < _ivf_nlist(count, build["nlist"]):
        raise ConfigError(f"index {kind!r}: nlist {build['nlist']} is more than the {count} embeddings")
    if not _whole(recall_sample, 0) or not _whole(recall_k, 1):
        raise ConfigError(f"index build: recall_sample must be >= 0 and recall_k >= 1, got {recall_sample!r}, "
                          f"{recall_k!r}")
    index = Index(spec.make(dim, count, **build), ids, kind, build, {})
    if _use_gpu(spec, kind, device):
        index._to_gpu()
    return spec, index, search


def _check_unique(ids: list[str], where: str) -> None:
    seen: dict[str, int] = {}
    for row, item in enumerate(ids):
        if seen.setdefault(item, row) != row:
            raise DataError(f"{where}[{row}]", "ids are unique", f"{item!r} is also row {seen[item]}")


def load_index(directory: str | Path, expect_dim: int | None = None, expect_count: int | None = None,
               device: str = "auto") -> Index:
    """Read an index written by ``Index.save`` and check meta, index and id map agree."""
    directory = Path(directory)
    paths = {name: directory / name for name in (INDEX_FILE, IDS_FILE, META_FILE)}
    for path in paths.values():
        if not path.is_file():
            raise DataError(str(path), "index folder has index.faiss, ids.json and meta.json", "file missing")
    meta_path = str(paths[META_FILE])
    meta, ids = read_json(paths[META_FILE], dict), read_json(paths[IDS_FILE], list)
    missing = {"kind", "dim", "count", "metric"} - set(meta)
    if missing:
        raise DataError(meta_path, "meta.json names kind, dim, count, metric", f"missing {sorted(missing)}")
    if meta["kind"] not in INDEXES:
        raise DataError(f"{meta_path}: kind", f"one of {INDEXES.names()}", f"got {meta['kind']!r}")
    if meta.get("build_options", {}).get("on_disk") and not (directory / LISTS_FILE).is_file():
        raise DataError(str(directory / LISTS_FILE), "an on_disk index folder has its inverted lists file",
                        "file missing")
    try:
        # on-disk inverted lists are read from the index's folder, wherever it was written
        index = faiss.read_index(str(paths[INDEX_FILE]), faiss.IO_FLAG_ONDISK_SAME_DIR)
    except RuntimeError as err:
        raise DataError(str(paths[INDEX_FILE]), "a readable FAISS index", str(err).splitlines()[0]) from None
    checks = [
        (meta["metric"] == METRIC, meta_path, "metric", f"metric is {METRIC!r}, got {meta['metric']!r}"),
        (index.metric_type == faiss.METRIC_INNER_PRODUCT, str(paths[INDEX_FILE]), "metric",
         f"index metric is inner product, got FAISS metric {index.metric_type}"),
        (index.d == meta["dim"], str(paths[INDEX_FILE]), "dim", f"index dim {index.d} != meta dim {meta['dim']}"),
        (index.ntotal == meta["count"], str(paths[INDEX_FILE]), "count",
         f"index holds {index.ntotal} vectors, meta count {meta['count']}"),
        (isinstance(ids, list) and len(ids) == index.ntotal, str(paths[IDS_FILE]), "count",
         f"{len(ids) if isinstance(ids, list) else 'no list of'} ids for {index.ntotal} index vectors"),
        (expect_dim is None or meta["dim"] == expect_dim, meta_path, "dim",
         f"expected dim {expect_dim}, index has {meta['dim']}"),
        (expect_count is None or meta["count"] == expect_count, meta_path, "count",
         f"expected {expect_count} items, index has {meta['count']}"),
    ]
    spec = INDEXES.get(meta["kind"])
    checks.append((isinstance(index, spec.classes), str(paths[INDEX_FILE]), "kind",
                   f"meta kind {meta['kind']!r} needs {' or '.join(c.__name__ for c in spec.classes)}, "
                   f"the file holds {type(index).__name__}"))
    for ok, where, what, detail in checks:
        if not ok:
            raise DataError(where, f"{what} matches", detail)
    _check_unique([str(i) for i in ids], str(paths[IDS_FILE]))
    loaded = Index(index, [str(i) for i in ids], meta["kind"], meta.get("build_options", {}),
                   meta.get("search_options", {}))
    loaded.build_stats = meta.get("build_stats", {})
    if _use_gpu(spec, meta["kind"], device):
        loaded._to_gpu()
        loaded.tune(**loaded.search_options)
    return loaded


def recall_vs_exact(approx: Index, exact: Index, queries, k: int) -> float:
    """Mean fraction of the exact top-k rows that ``approx`` also returns in its top-k."""
    return _overlap(approx.search(queries, k)[1], exact.search(queries, k)[1])


def _overlap(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` [Q, k] that the same row of ``found`` [Q, k] holds (-1: none)."""
    hits = sum(len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth))
    return hits / truth.size
