"""The "ivfpq" index kind: inverted lists of product-quantised codes, for galleries larger than memory.

Each vector is stored as ``m`` one-byte codes (``nbits`` 8) plus its 8-byte id: 72 bytes a
vector at ``m`` 64 against 2,048 for float32 512-d. The coarse quantiser (``nlist``
centroids) and the PQ codebooks are trained on a sample (``train_size`` rows) so that
training time does not grow with the gallery. With ``on_disk`` the inverted lists are
written to ``lists.ivfdata`` beside ``index.faiss`` and memory-mapped when loaded
(FAISS ``OnDiskInvertedLists``): only the lists a query probes are read.

Imported by :mod:`cmr.retrieval.index`, which registers it; use ``build_index("ivfpq", ...)``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import faiss

from cmr.errors import ConfigError

LISTS_FILE = "lists.ivfdata"
# FAISS's k-means warns below 39 points a centroid and samples down above 256: 64 a list,
# and at least 64 a PQ centroid, trains both stages well at a cost that does not grow with N.
_ROWS_PER_CENTROID = 64


def pq_m(dim: int, m: int | None) -> int:
    """Sub-quantisers: ``m`` itself (it must divide ``dim``), or by default the largest divisor
    of ``dim`` that leaves at least 8 dimensions to each (64 for 512-d, 57 for 513-d)."""
    if m is None:
        return max(d for d in range(1, max(1, dim // 8) + 1) if dim % d == 0)
    if isinstance(m, bool) or not isinstance(m, int) or m < 1 or dim % m:
        raise ConfigError(f"index 'ivfpq': m must be a whole number >= 1 that divides the dimension {dim}, got {m!r} "
                          "(a calibration bias adds one dimension to the image index: leave m null to choose it)")
    return m


def make(dim: int, count: int, nlist_of, nlist=None, m=None, nbits=8, train_size=None, on_disk=False):
    """An untrained ``faiss.IndexIVFPQ`` (inner product). ``nlist_of(count, nlist)`` picks the list count."""
    if not 1 <= nbits <= 16:
        raise ConfigError(f"index 'ivfpq': nbits must be between 1 and 16, got {nbits!r}")
    if not isinstance(on_disk, bool):
        raise ConfigError(f"index 'ivfpq': on_disk must be true or false, got {on_disk!r}")
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist_of(count, nlist), pq_m(dim, m), int(nbits),
                             faiss.METRIC_INNER_PRODUCT)
    # Each of the m codebooks is a k-means over 8-ish dimensions, which BLAS does not speed up:
    # at FAISS's default (256 points a centroid) training 64 of them on 65k rows took minutes on
    # two cores. 64 points a centroid is FAISS's own lower comfort bound (it warns below 39).
    index.pq.cp.max_points_per_centroid = _ROWS_PER_CENTROID
    return index


def train_rows(count: int, build: dict, index: faiss.Index) -> int:
    """Rows to train ``index`` on: ``train_size``, or 64 a coarse centroid and 64 a PQ centroid, at most ``count``."""
    nlist = index.nlist
    size = build.get("train_size")
    if size is None:
        size = _ROWS_PER_CENTROID * max(nlist, 2 ** int(build.get("nbits", 8)))
    elif isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"index 'ivfpq': train_size must be a whole number >= 1 (or null), got {size!r}")
    rows = min(count, size)
    if rows < max(nlist, 2 ** int(build.get("nbits", 8))):
        raise ConfigError(f"index 'ivfpq': {rows} training rows are fewer than nlist {nlist} or the "
                          f"2^nbits = {2 ** int(build.get('nbits', 8))} centroids of each PQ sub-quantiser")
    return rows


@contextlib.contextmanager
def lists_on_disk(index: faiss.Index, path: Path):
    """Within the block ``index`` holds a copy of its inverted lists in ``path`` (an
    ``OnDiskInvertedLists`` file); afterwards its own lists are back, untouched."""
    ivf = faiss.extract_index_ivf(index)
    own, lists = ivf.own_invlists, ivf.invlists
    disk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(path))
    for number in range(ivf.nlist):
        n = lists.list_size(number)
        if n:
            disk.add_entries(number, n, lists.get_ids(number), lists.get_codes(number))
    ivf.own_invlists = False  # replace_invlists would free the lists it replaces
    ivf.replace_invlists(disk, False)
    try:
        yield
    finally:
        ivf.replace_invlists(lists, own)
