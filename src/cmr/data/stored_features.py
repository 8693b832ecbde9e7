"""A prepared dataset's feature arrays read from disk row by row instead of all at once.

``np.savez`` (what :func:`cmr.data.prepare.save_prepared` writes) stores each array as an
uncompressed ``.npy`` member of a zip archive, so its data lie contiguous in
``features.npz`` and can be memory-mapped at their offset. :class:`StoredArray` maps the
member only for the length of one indexing call and returns a copy of the rows asked for:
a caller that takes a split shard by shard (:func:`cmr.training.encoding.encode_split_sharded`)
holds one shard's rows, not the corpus. A mapping kept open would keep every page it has
touched in the process's resident memory until it is closed, which is why none is kept.
"""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, 22 bytes of fields, name length, extra length
# .npy format versions numpy has public header readers for (np.savez writes 1.0, or 2.0 for huge headers)
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class StoredArray:
    """Read-only (N, D) array, member ``name`` of the uncompressed ``.npz`` at ``path``.

    ``a[key]`` (an int, a slice, a list or array of rows) returns a new ``np.ndarray`` with
    only those rows read; ``np.asarray(a)`` reads it whole. The file stays open from
    construction, so a prepared folder replaced meanwhile (atomic rename) is not mixed in.
    """

    def __init__(self, file, name: str, offset: int, shape: tuple[int, ...], dtype: np.dtype, fortran_order: bool):
        """``file``: the archive opened for binary reading (kept, closed with this object);
        ``offset``: where the member's data start in it, after its ``.npy`` header."""
        self._file, self.path, self.name = file, Path(file.name), name
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)
        self._offset, self._order = offset, "F" if fortran_order else "C"

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        mapped = np.memmap(self._file, dtype=self.dtype, mode="r", offset=self._offset, shape=self.shape,
                           order=self._order)
        part = mapped[key]
        # a basic index is a view of the mapping: copy it; an advanced one is a copy already
        return np.array(part) if isinstance(part, np.memmap) else part

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[...]
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def __reduce__(self):  # an open file does not pickle: reopen the member by name
        return open_npz_member, (self.path, self.name)

    def __repr__(self) -> str:
        return f"StoredArray({str(self.path)!r}, {self.name!r}, shape={self.shape}, dtype={self.dtype})"

    def __del__(self):
        if getattr(self, "_file", None) is not None:
            self._file.close()


def open_npz_member(path: str | Path, name: str) -> StoredArray | np.ndarray:
    """Array ``name`` of the ``.npz`` at ``path``: a :class:`StoredArray` when the member is
    stored uncompressed with a plain dtype and holds data, else (``np.savez_compressed``, an
    empty array) the array read whole. KeyError when the archive has no such member."""
    f = open(path, "rb")  # one open file for the header and the data: a rename over path changes neither
    try:
        with zipfile.ZipFile(f) as archive:  # a ZipFile given a file object leaves it open
            info = archive.getinfo(f"{name}.npy")
        f.seek(info.header_offset)
        signature, name_len, extra_len = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        if signature == b"PK\x03\x04" and info.compress_type == zipfile.ZIP_STORED:
            f.seek(name_len + extra_len, 1)
            read_header = _HEADER_READERS.get(np.lib.format.read_magic(f))
            if read_header is not None:
                shape, fortran_order, dtype = read_header(f)
                if not dtype.hasobject and int(np.prod(shape)) > 0:
                    return StoredArray(f, name, f.tell(), shape, dtype, fortran_order)
        f.seek(0)
        with np.load(f, allow_pickle=False) as z:
            whole = z[name]
    except BaseException:
        f.close()
        raise
    f.close()
    return whole
