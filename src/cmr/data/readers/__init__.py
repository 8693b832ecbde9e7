"""Dataset readers: turn a source folder (or file) into :class:`~cmr.data.schema.Item` lists.

Every reader is registered in :data:`READERS` and called as ``fn(source, **options)``; it
returns a :class:`ReadResult` (the contract is in :mod:`cmr.data.readers.base`). Importing
this package imports every reader module, so whoever reads ``READERS`` sees every reader.

Which module holds which readers:

* :mod:`~cmr.data.readers.base`: ``READERS``, ``ReadResult``, the ``@_reader`` decorator
  with its option check, and the file, JSON and row helpers every reader uses;
* :mod:`~cmr.data.readers.clipart`: openclipart, tuxpaint, gcompris (``items.jsonl`` +
  ``images/``), and the collection-title rule;
* :mod:`~cmr.data.readers.captions`: coco, flickr8k, karpathy;
* :mod:`~cmr.data.readers.features`: features_npz, features_mat (precomputed features);
* :mod:`~cmr.data.readers.persons`: cuhk_pedes (person search);
* :mod:`cmr.data.av_readers`: the audio and video readers;
* :mod:`cmr.data.table_reader`: ``table``, any JSON-lines or CSV file.
"""
from __future__ import annotations

from cmr.data.readers.base import READERS, ReadResult
from cmr.data.readers.captions import FLICKR8K_IMAGE_DIRS, FLICKR8K_SPLIT_FILES, read_coco, read_flickr8k, read_karpathy
from cmr.data.readers.clipart import (
    COLLECTION_TITLE_PREFIXES, COLLECTION_TITLES, is_collection_title, read_gcompris, read_openclipart, read_tuxpaint,
)
from cmr.data.readers.features import read_features_mat, read_features_npz
from cmr.data.readers.persons import read_cuhk_pedes

# The audio/video readers and the generic JSONL/CSV reader live outside this package and
# register when imported: importing them here lets every caller of READERS see them.
from cmr.data import av_readers, table_reader  # noqa: E402,F401

__all__ = [
    "READERS", "ReadResult", "COLLECTION_TITLES", "COLLECTION_TITLE_PREFIXES", "FLICKR8K_IMAGE_DIRS",
    "FLICKR8K_SPLIT_FILES", "is_collection_title", "read_coco", "read_cuhk_pedes", "read_features_mat",
    "read_features_npz", "read_flickr8k", "read_gcompris", "read_karpathy", "read_openclipart", "read_tuxpaint",
]
