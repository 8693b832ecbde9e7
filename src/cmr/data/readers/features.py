"""Readers of precomputed features (no media): one ``.npz`` (features_npz) or the original
Wikipedia CMR ``.mat`` + list files (features_mat)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np

from cmr.data.readers.base import ReadResult, _label_set, _one_file, _read_text, _reader
from cmr.data.schema import SPLITS, Item
from cmr.errors import DataError


# ---------------------------------------------------------------- precomputed features


def _features_result(
    per_split: dict[str, dict[str, np.ndarray]],
    labels: dict[str, np.ndarray],
    row_meta: dict[str, dict[str, np.ndarray]],
    categories: list[str] | None,
    where: str,
    name: str,
    root: Path,
    origin: Callable[[str, int], str],
) -> ReadResult:
    """Stack per-split modality arrays into one (N, D) array per modality; items in split order.
    ``origin(split, i)`` says where row ``i`` of ``split`` was read, for errors found later."""
    modalities = sorted({m for arrays in per_split.values() for m in arrays})
    items: list[Item] = []
    origins: dict[str, str] = {}
    stacked: dict[str, list[np.ndarray]] = {m: [] for m in modalities}
    for split in (s for s in SPLITS if s in per_split):
        arrays = per_split[split]
        for m in modalities:
            if m not in arrays:
                raise DataError(where, "every split has every modality", f"'{split}_{m}' is missing")
        split_labels = np.asarray(labels[split])
        if split_labels.ndim != 1:
            raise DataError(where, "labels are a 1-D array", f"'{split}_label' has shape {split_labels.shape}")
        if categories is not None:
            if not np.issubdtype(split_labels.dtype, np.integer):
                raise DataError(where, "labels are integers 0..C-1", f"'{split}_label' has dtype {split_labels.dtype}")
            bad = split_labels[(split_labels < 0) | (split_labels >= len(categories))]
            if bad.size:
                raise DataError(where, "labels are integers 0..C-1", f"'{split}_label' holds {bad[0]}, C = {len(categories)}")
        n = len(split_labels)
        for m, arr in arrays.items():
            if arr.ndim != 2 or arr.shape[0] != n:
                raise DataError(where, "one feature row per label", f"'{split}_{m}' has shape {arr.shape}, {n} labels")
            stacked[m].append(arr)
        for key, values in row_meta.get(split, {}).items():
            if np.ndim(values) != 1 or len(values) != n:
                raise DataError(where, "one value per label", f"'{split}_{key}' has shape {np.shape(values)}, {n} labels")
        for i in range(n):
            raw = labels[split][i]
            label = categories[int(raw)] if categories is not None else str(raw)
            meta = {key: str(values[i]) for key, values in row_meta.get(split, {}).items()}
            items.append(
                Item(id=f"{split}/{i:04d}", split=split, labels=(label,), feature_row=len(items), meta=meta)
            )
            origins[items[-1].id] = origin(split, i)
    dims = {m: {a.shape[1] for a in stacked[m]} for m in modalities}
    for m, d in dims.items():
        if len(d) != 1:
            raise DataError(where, "one feature dim per modality", f"'{m}' has dims {sorted(d)} across splits")
    features = {m: np.concatenate(stacked[m]) for m in modalities}
    label_set = list(categories) if categories is not None else _label_set(items)
    return ReadResult(items, root, features, label_set, name, origins)


@_reader("features_npz")
def read_features_npz(source: Path, splits: list[str] | None = None) -> ReadResult:
    """Precomputed features in one ``.npz`` (the wikipedia_cmr layout): ``<split>_<modality>``
    float arrays (N, D), ``<split>_label`` (N,) ints, optional ``categories`` (C,) names
    (label k -> categories[k]); other (N,) ``<split>_*`` arrays go to ``meta``.

    ``splits`` restricts reading to some splits (e.g. ``["test"]`` where a split lacks a
    modality, as in pascal_sentence_partial).
    """
    path = _one_file(source, "*.npz")
    per_split: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    labels: dict[str, np.ndarray] = {}
    row_meta: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    with np.load(path, allow_pickle=False) as z:
        categories = [str(c) for c in z["categories"]] if "categories" in z.files else None
        for key in z.files:
            split, _, field = key.partition("_")
            if split not in SPLITS or not field or (splits is not None and split not in splits):
                continue
            arr = z[key]
            if field == "label":
                labels[split] = arr
            elif arr.ndim == 2 and np.issubdtype(arr.dtype, np.number):
                per_split[split][field] = arr
            else:
                row_meta[split][field] = arr
    for split in per_split:
        if split not in labels:
            raise DataError(str(path), "every split has labels", f"'{split}_label' is missing")
    if not per_split:
        raise DataError(str(path), "arrays named <split>_<modality>", f"found {sorted(labels)} only")
    # an .npz has no lines: row i of every <split>_* array
    return _features_result(per_split, labels, row_meta, categories, str(path), path.stem, path.parent,
                            lambda split, i: f"{path}:{split}_*[{i}]")


@_reader("features_mat")
def read_features_mat(source: Path) -> ReadResult:
    """The original Wikipedia CMR files: ``raw_features.mat`` (I_tr, T_tr, I_te, T_te; one
    row per sample) beside ``trainset_txt_img_cat.list`` / ``testset_txt_img_cat.list``
    (tab-separated text id, image id, class 1..C; line i = row i) and ``categories.list``.
    ``source`` is that folder or the ``.mat`` file in it."""
    from scipy.io import loadmat

    mat_path = _one_file(source, "*.mat")
    folder = mat_path.parent
    mat = loadmat(mat_path)
    categories = _read_text(folder / "categories.list").split()
    per_split, labels, row_meta, lines = {}, {}, {}, {}
    for split, suffix, list_name in (("train", "tr", "trainset_txt_img_cat.list"), ("test", "te", "testset_txt_img_cat.list")):
        list_path = folder / list_name
        numbered = [(n, line.split("\t")) for n, line in enumerate(_read_text(list_path).splitlines(), 1)
                    if line.strip()]
        for lineno, r in numbered:
            if len(r) != 3 or not r[2].strip().isdigit() or not 1 <= int(r[2]) <= len(categories):
                raise DataError(f"{list_path}:{lineno}", "text id<TAB>image id<TAB>class 1..C", repr(r))
        for key in (f"I_{suffix}", f"T_{suffix}"):
            if key not in mat:
                raise DataError(str(mat_path), f"variable {key} present", f"variables: {sorted(mat)}")
        rows = [r for _, r in numbered]
        per_split[split] = {"image": np.asarray(mat[f"I_{suffix}"]), "text": np.asarray(mat[f"T_{suffix}"])}
        labels[split] = np.array([int(r[2]) - 1 for r in rows])
        row_meta[split] = {"text_id": np.array([r[0] for r in rows]), "image_id": np.array([r[1] for r in rows])}
        lines[split] = [f"{list_path}:{lineno}" for lineno, _ in numbered]
    # row i of I_tr / T_tr is the i-th entry of the split's list file: name its line
    return _features_result(per_split, labels, row_meta, categories, str(mat_path), mat_path.stem, folder,
                            lambda split, i: lines[split][i])
