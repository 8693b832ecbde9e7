"""Deterministic, leak-free train/val/test assignment.

Two items that share content must land in the same split, or a model is tested on
what it was trained on. "Sharing content" means any of:

* the same media file content (SHA-256 of the image/audio/video bytes; openclipart
  and tuxpaint both hold the same picture under several names),
* an identical caption after case folding and whitespace collapsing
  ("A flower." on six Tux Paint stamps),
* an identical precomputed feature row (7 duplicated image rows in wikipedia_cmr),
* the same group, when the reader names one in ``meta["group"]``: the recording (or
  film) a window was cut from, the picture a spoken word belongs to. Windows of one
  recording share sound and style without sharing bytes.

Items are joined into groups by union-find over these keys and a whole group gets one
split, so there is no leakage by construction. A group's split comes from a hash of
the seed and the group's smallest item id, so the result does not depend on the
order of the input and adding an item moves only the group it joins.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

import numpy as np

from cmr.data.schema import SPLITS, Item
from cmr.errors import ConfigError, DataError

MEDIA_FIELDS = ("image", "audio", "video")


def normalise_caption(text: str) -> str:
    """Case-folded, whitespace-collapsed caption: the form two captions are compared in."""
    return " ".join(text.casefold().split())


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_keys(
    items: list[Item], root: str | Path | None, features: dict[str, np.ndarray] | None = None
) -> list[set[str]]:
    """For each item, the keys under which two items count as the same content.

    With ``root`` None (or a media file missing) a media file is keyed by its path,
    which still joins items naming the same file.
    """
    features = features or {}
    keys: list[set[str]] = []
    for it in items:
        k: set[str] = set()
        for field in MEDIA_FIELDS:
            rel = getattr(it, field)
            if rel is None:
                continue
            path = Path(root) / rel if root is not None else None
            if path is not None and path.is_file():
                k.add(f"{field} content sha256:{file_sha256(path)}")
            else:
                k.add(f"{field} path {rel!r}")
        k |= {f"caption {normalise_caption(t)!r}" for t in it.texts if normalise_caption(t)}
        if it.meta.get("group") is not None:
            k.add(f"group {it.meta['group']!r}")
        if it.feature_row is not None:
            for m, arr in features.items():
                if 0 <= it.feature_row < len(arr):
                    row = np.ascontiguousarray(arr[it.feature_row])
                    k.add(f"{m} feature row sha256:{hashlib.sha256(row.tobytes()).hexdigest()}")
        keys.append(k)
    return keys


def content_groups(keys: list[set[str]]) -> list[int]:
    """Union-find over shared keys: ``group[i]`` is the index of item i's group representative."""
    parent = list(range(len(keys)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[str, int] = {}
    for i, ks in enumerate(keys):
        for key in ks:
            j = first_with.setdefault(key, i)
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    return [find(i) for i in range(len(keys))]


def _unit_hash(seed: int, key: str) -> float:
    """A number in [0, 1) fixed by (seed, key): the group's place in the fill order."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _fill_in_order(sizes: list[int], target: dict[str, float]) -> list[str]:
    """Split of each group (sizes in hash order): test, then val, until their item counts
    reach the targets; the rest train. Filling by count (rather than a coin per group)
    keeps the fractions close when groups are small."""
    out, filled = [], 0
    for n in sizes:
        out.append("test" if filled < target["test"] else "val" if filled < target["test"] + target["val"] else "train")
        filled += n
    return out


def _misfilled(chosen: list[str], sizes: list[int], target: dict[str, float]) -> bool:
    """True when test or val (with a target) ended empty or above twice its target: one
    large group took a whole split. Small groups never do this, so their splits stay
    those of the in-order fill."""
    count = {s: sum(n for n, c in zip(sizes, chosen) if c == s) for s in ("test", "val")}
    return any(target[s] > 0 and not 0 < count[s] <= 2 * target[s] for s in count)


def _fill_by_deficit(sizes: list[int], target: dict[str, float]) -> list[str]:
    """Split of each group when :func:`_fill_in_order` misfilled (:func:`_misfilled`), as
    when a few large groups (whole recordings) hold most items and the first of them
    swallows test: each group goes to the split (test or val) furthest below its target among
    those it brings closer to it (count + size/2 <= target), else to train."""
    out, count = [], {"test": 0, "val": 0}
    for n in sizes:
        fits = [s for s in ("test", "val") if target[s] > 0 and count[s] + n / 2 <= target[s]]
        split = max(fits, key=lambda s: target[s] - count[s], default="train")
        if split != "train":
            count[split] += n
        out.append(split)
    return out


def assign_splits(
    items: list[Item],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    *,
    root: str | Path | None = None,
    features: dict[str, np.ndarray] | None = None,
    where: str = "items",
) -> list[Item]:
    """Give every item a split in train/val/test, keeping content groups together.

    * Source without splits (all ``split == ""``): groups, in the order of their hash,
      fill test up to ``test_fraction`` of the items, then val up to ``val_fraction``;
      the rest is train. If that leaves test or val empty, or above twice its target (a
      large group came first and took all of test), groups are dealt by
      :func:`_fill_by_deficit` instead, which keeps large groups in train when smaller
      ones can fill test and val.
    * Source with splits: items keep them. A split the source lacks (val, or test) is
      carved from train groups so that it holds about that fraction of ALL items.
      Groups that already straddle source splits are left as they are; that leakage is
      the source's and :func:`find_leakage` reports it.

    ``root`` is the folder media paths are relative to (files are compared by content);
    ``features`` are the (N, D) arrays ``feature_row`` points into. Returns new items in
    the input order. ``where`` (the source) prefixes error messages.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction}: each must be >= 0 and their sum < 1"
        )
    for it in items:
        if it.split not in ("",) + SPLITS:
            raise DataError(f"{where}: item {it.id!r}", "split in train/val/test", f"split is {it.split!r}")
    sourced = {it.split for it in items} - {""}
    if sourced and any(it.split == "" for it in items):
        with_split = next(it.id for it in items if it.split)
        without = next(it.id for it in items if not it.split)
        raise DataError(
            where, "split given for all items or for none",
            f"some have {sorted(sourced)} (e.g. item {with_split!r}), some none (e.g. item {without!r})",
        )

    group = content_groups(content_keys(items, root, features))
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(group):
        members[g].append(i)
    group_key = {g: min(items[i].id for i in idx) for g, idx in members.items()}

    if not sourced:
        eligible = list(members)
        target = {"test": test_fraction * len(items), "val": val_fraction * len(items)}
    else:
        eligible = [g for g, idx in members.items() if all(items[i].split == "train" for i in idx)]
        target = {s: (f * len(items) if s not in sourced else 0.0) for s, f in (("test", test_fraction), ("val", val_fraction))}

    order = sorted(eligible, key=lambda g: _unit_hash(seed, group_key[g]))
    sizes = [len(members[g]) for g in order]
    chosen = _fill_in_order(sizes, target)
    if _misfilled(chosen, sizes, target):
        chosen = _fill_by_deficit(sizes, target)
    new_split = [it.split for it in items]
    for g, split in zip(order, chosen):
        for i in members[g]:
            new_split[i] = split
    return [it if it.split == s else dataclasses.replace(it, split=s) for it, s in zip(items, new_split)]


def _leaks(items: list[Item], root, features) -> list[tuple[str, list[int]]]:
    """(key, item indices) for every content key that occurs in more than one split."""
    holders: dict[str, list[int]] = defaultdict(list)
    for i, ks in enumerate(content_keys(items, root, features)):
        if items[i].split:
            for key in ks:
                holders[key].append(i)
    return sorted(
        (key, idx) for key, idx in holders.items() if len({items[i].split for i in idx}) > 1
    )


def find_leakage(
    items: list[Item], root: str | Path | None, features: dict[str, np.ndarray] | None = None
) -> list[str]:
    """One message per piece of content (media file bytes, normalised caption, feature
    row) that occurs in more than one split; empty when the splits are leak-free."""
    out = []
    for key, idx in _leaks(items, root, features):
        per_split = Counter(items[i].split for i in idx)
        shown = ", ".join(f"{items[i].id!r} ({items[i].split})" for i in idx[:4])
        more = f" and {len(idx) - 4} more" if len(idx) > 4 else ""
        out.append(f"{key} is in splits {dict(sorted(per_split.items()))}: items {shown}{more}")
    return out


def leaking_items(
    items: list[Item], root: str | Path | None, features: dict[str, np.ndarray] | None = None
) -> dict[int, str]:
    """Item index -> the first shared content key that puts it in a leak."""
    out: dict[int, str] = {}
    for key, idx in _leaks(items, root, features):
        for i in idx:
            out.setdefault(i, key)
    return out


def split_counts(items: Iterable[Item]) -> dict[str, int]:
    counts = Counter(it.split for it in items)
    return {s: counts.get(s, 0) for s in SPLITS}
