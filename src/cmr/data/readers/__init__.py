"""Dataset readers: the public names of :mod:`cmr.data.readers.base`, which holds them all
(importing it registers every reader, including those of av_readers and table_reader)."""
from __future__ import annotations

from cmr.data.readers.base import (
    COLLECTION_TITLE_PREFIXES, COLLECTION_TITLES, FLICKR8K_IMAGE_DIRS, FLICKR8K_SPLIT_FILES, READERS, ReadResult,
    is_collection_title, read_coco, read_cuhk_pedes, read_features_mat, read_features_npz, read_flickr8k,
    read_gcompris, read_karpathy, read_openclipart, read_tuxpaint,
)

__all__ = [
    "READERS", "ReadResult", "COLLECTION_TITLES", "COLLECTION_TITLE_PREFIXES", "FLICKR8K_IMAGE_DIRS",
    "FLICKR8K_SPLIT_FILES", "is_collection_title", "read_coco", "read_cuhk_pedes", "read_features_mat",
    "read_features_npz", "read_flickr8k", "read_gcompris", "read_karpathy", "read_openclipart", "read_tuxpaint",
]
