"""Split assignment: deterministic, stable under reordering, leak-free by construction."""
from __future__ import annotations

import dataclasses
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cmr.data.readers import READERS
from cmr.data.schema import Item
from cmr.data.splits import (
    assign_splits,
    content_groups,
    content_keys,
    find_leakage,
    normalise_caption,
    split_counts,
)
from cmr.errors import ConfigError, DataError

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data" / "raw" / "openclipart_mini"


@pytest.fixture(scope="module")
def mini():
    return READERS.get("openclipart")(DEFAULT_DATA)


@pytest.fixture(scope="module")
def tuxpaint(shared_datasets):
    return READERS.get("tuxpaint")(shared_datasets / "tuxpaint")


def _mapping(items):
    return {it.id: it.split for it in items}


def test_deterministic_and_stable_under_reordering(mini):
    first = assign_splits(mini.items, 0.1, 0.15, seed=0, root=mini.root)
    again = assign_splits(mini.items, 0.1, 0.15, seed=0, root=mini.root)
    assert first == again
    shuffled = list(mini.items)
    random.Random(7).shuffle(shuffled)
    assert _mapping(assign_splits(shuffled, 0.1, 0.15, seed=0, root=mini.root)) == _mapping(first)
    other_seed = assign_splits(mini.items, 0.1, 0.15, seed=1, root=mini.root)
    moved = sum(a.split != b.split for a, b in zip(first, other_seed))
    assert moved > len(first) // 10  # a different seed is a different draw


def test_adding_items_moves_only_their_groups(mini):
    base = _mapping(assign_splits(mini.items[:1500], 0.1, 0.15, seed=0, root=mini.root))
    grown = _mapping(assign_splits(mini.items, 0.1, 0.15, seed=0, root=mini.root))
    changed = [i for i in base if base[i] != grown[i]]
    # groups keep their place in the hash order: only groups that gained members and a
    # few at the moved test/val/train boundaries change (a fresh random draw moves ~40 %)
    assert len(changed) < 0.05 * len(base)


@pytest.mark.parametrize("dataset", ["mini", "tuxpaint"])
def test_fractions_and_no_leakage(dataset, request):
    result = request.getfixturevalue(dataset)
    items = assign_splits(result.items, 0.1, 0.15, seed=0, root=result.root)
    counts = split_counts(items)
    n = len(items)
    assert abs(counts["val"] / n - 0.1) < 0.02 and abs(counts["test"] / n - 0.15) < 0.02, counts
    assert find_leakage(items, result.root) == []


def test_repeated_captions_share_a_split(tuxpaint):
    """README: 'A flower.' is the text of 6 stamps; filled/outlined letters share texts."""
    items = assign_splits(tuxpaint.items, 0.1, 0.15, seed=3, root=tuxpaint.root)
    by_caption: dict[str, set[str]] = {}
    for it in items:
        for t in it.texts:
            by_caption.setdefault(normalise_caption(t), set()).add(it.split)
    assert len([it for it in items if it.texts == ("A flower.",)]) == 6
    assert all(len(s) == 1 for s in by_caption.values())


def test_content_groups_match_naive_connected_components():
    rng = random.Random(0)
    keys = [{f"k{rng.randrange(60)}" for _ in range(rng.randrange(0, 3))} for _ in range(200)]
    # naive reference: repeated relaxation of a component label until nothing changes
    label = list(range(len(keys)))
    changed = True
    while changed:
        changed = False
        for i in range(len(keys)):
            for j in range(len(keys)):
                if keys[i] & keys[j] and label[j] < label[i]:
                    label[i], changed = label[j], True
    assert content_groups(keys) == label


def test_source_splits_kept_and_val_carved_from_train(shared_datasets):
    wiki = READERS.get("features_npz")(shared_datasets / "wikipedia_cmr")
    items = assign_splits(wiki.items, 0.1, 0.15, seed=0, root=wiki.root, features=wiki.features)
    before = _mapping(wiki.items)
    for it in items:
        assert before[it.id] == it.split or (before[it.id], it.split) == ("train", "val")
    counts = split_counts(items)
    assert counts["test"] == 693  # source test kept whole, none carved
    assert abs(counts["val"] / len(items) - 0.1) < 0.03
    # duplicated feature rows inside train go to one side of the train/val cut
    keys = content_keys(items, wiki.root, wiki.features)
    groups = Counter(content_groups(keys))
    assert max(groups.values()) >= 2
    carved = [it for it in items if it.split == "val"]
    assert find_leakage(carved + [it for it in items if it.split == "train"], wiki.root, wiki.features) == []


def test_source_leakage_is_reported_not_hidden(shared_datasets):
    """In the CUHK-PEDES sample the 4 images of person 0005 are in a val file and a test file."""
    src = shared_datasets / "cuhk_pedes_sample"
    pedes = READERS.get("cuhk_pedes")(src, skip_missing_images=True)
    items = assign_splits(pedes.items, 0.1, 0.15, seed=0, root=pedes.root)
    assert _mapping(items) == _mapping(pedes.items)  # every split came from the source: nothing moved
    leaks = find_leakage(items, pedes.root)
    image_leaks = [m for m in leaks if m.startswith("image content")]
    assert len(image_leaks) == 4 and all("0005" in m for m in image_leaks)


def _two_items(image_a: str, image_b: str, text_a: str, text_b: str) -> list[Item]:
    return [
        Item(id="a", split="train", texts=(text_a,), image=image_a),
        Item(id="b", split="test", texts=(text_b,), image=image_b),
    ]


def test_find_leakage_catches_planted_duplicate_caption(mini):
    items = assign_splits(mini.items, 0.1, 0.15, seed=0, root=mini.root)
    assert find_leakage(items, mini.root) == []
    train = next(it for it in items if it.split == "train")
    k, test = next((k, it) for k, it in enumerate(items) if it.split == "test")
    planted = list(items)
    planted[k] = dataclasses.replace(test, texts=test.texts + ("  " + train.texts[0].upper() + " ",))
    leaks = find_leakage(planted, mini.root)
    assert len(leaks) == 1
    assert normalise_caption(train.texts[0]) in leaks[0] and repr(train.id) in leaks[0] and repr(test.id) in leaks[0]
    # and assign_splits, given the unsplit items, keeps the pair together
    unsplit = [dataclasses.replace(it, split="") for it in planted]
    resplit = _mapping(assign_splits(unsplit, 0.1, 0.15, seed=0, root=mini.root))
    assert resplit[train.id] == resplit[test.id]


def test_find_leakage_catches_planted_duplicate_image(mini, tmp_path):
    a, b = mini.items[0], mini.items[1]
    shutil.copyfile(mini.root / a.image, tmp_path / "a.jpg")
    shutil.copyfile(mini.root / b.image, tmp_path / "b.jpg")
    shutil.copyfile(mini.root / a.image, tmp_path / "a_again.jpg")  # same bytes, other name
    clean = _two_items("a.jpg", "b.jpg", "one caption", "another caption")
    assert find_leakage(clean, tmp_path) == []
    planted = _two_items("a.jpg", "a_again.jpg", "one caption", "another caption")
    leaks = find_leakage(planted, tmp_path)
    assert len(leaks) == 1 and leaks[0].startswith("image content sha256:") and "'a' (train)" in leaks[0]
    unsplit = [dataclasses.replace(it, split="") for it in planted]
    assert len({it.split for it in assign_splits(unsplit, 0.3, 0.3, seed=5, root=tmp_path)}) == 1


def test_find_leakage_catches_duplicate_feature_rows():
    features = {"image": np.array([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]])}
    items = [Item(id=str(i), split=s, feature_row=i) for i, s in enumerate(["train", "val", "test"])]
    leaks = find_leakage(items, None, features)
    assert len(leaks) == 1 and "'0' (train)" in leaks[0] and "'2' (test)" in leaks[0]


def test_bad_arguments():
    items = [Item(id="a", split="", texts=("x",))]
    with pytest.raises(ConfigError, match="sum < 1"):
        assign_splits(items, 0.6, 0.5, seed=0)
    with pytest.raises(DataError, match="split in train/val/test"):
        assign_splits([Item(id="a", split="dev", texts=("x",))], 0.1, 0.1, seed=0)
    with pytest.raises(DataError, match="for all items or for none"):
        assign_splits(items + [Item(id="b", split="train", texts=("y",))], 0.1, 0.1, seed=0)


def test_split_errors_name_the_source():
    with pytest.raises(DataError, match=r"^data/raw/x: item 'a': breaks rule 'split in train/val/test': split is 'dev'"):
        assign_splits([Item(id="a", split="dev", texts=("x",))], 0.1, 0.1, seed=0, where="data/raw/x")
    mixed = [Item(id="a", split="", texts=("x",)), Item(id="b", split="train", texts=("y",))]
    with pytest.raises(DataError, match=r"^data/raw/x: breaks rule .*e\.g\. item 'b'.*e\.g\. item 'a'"):
        assign_splits(mixed, 0.1, 0.1, seed=0, where="data/raw/x")


def _grouped_items(sizes: list[int]) -> list[Item]:
    """Items in groups of the given sizes (``meta["group"]`` only: no shared media or text)."""
    return [Item(id=f"g{g}/{k}", split="", texts=(f"text {g} {k}",), meta={"group": f"g{g}"})
            for g, n in enumerate(sizes) for k in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_a_group_never_straddles_splits(seed):
    rng = random.Random(seed)
    sizes = [rng.choice([1, 1, 2, 3, 8, 40]) for _ in range(60)]
    items = assign_splits(_grouped_items(sizes), 0.1, 0.15, seed=seed)
    splits_of: dict[str, set[str]] = {}
    for it in items:
        splits_of.setdefault(it.meta["group"], set()).add(it.split)
    assert all(len(s) == 1 for s in splits_of.values()) and len(splits_of) == 60
    assert min(split_counts(items).values()) > 0
    # the group key is a content key: two items of a group share it, and a leak when split
    pair = _grouped_items([2])
    assert set.intersection(*content_keys(pair, None)) == {"group 'g0'"}
    leak = find_leakage([dataclasses.replace(pair[0], split="test"), dataclasses.replace(pair[1], split="train")], None)
    assert leak and leak[0].startswith("group 'g0' is in splits")


def _old_fill(items: list[Item], val_fraction: float, test_fraction: float, seed: int, root) -> dict[str, str]:
    """The fill rule as it was before groups could exceed a split: test, then val, in hash order."""
    from cmr.data.splits import _unit_hash

    group = content_groups(content_keys(items, root))
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group):
        members.setdefault(g, []).append(i)
    order = sorted(members, key=lambda g: _unit_hash(seed, min(items[i].id for i in members[g])))
    out, filled = {}, 0
    for g in order:
        split = "test" if filled < test_fraction * len(items) else (
            "val" if filled < (test_fraction + val_fraction) * len(items) else "train")
        filled += len(members[g])
        out |= {items[i].id: split for i in members[g]}
    return out


def test_splits_that_filled_before_are_unchanged(mini):
    for seed in (0, 1):
        assert _mapping(assign_splits(mini.items, 0.1, 0.15, seed, root=mini.root)) == \
            _old_fill(mini.items, 0.1, 0.15, seed, mini.root)


def test_large_groups_stay_in_train_when_they_would_empty_val():
    """Two whole recordings (29 and 38 windows) and 11 one-item groups, as in av_sample:
    filling test first in hash order would put a recording in test and leave val empty."""
    items = _grouped_items([29, 38] + [1] * 11)
    for seed in range(6):
        out = assign_splits(items, 0.1, 0.15, seed)
        counts = split_counts(out)
        assert counts == {"train": 67, "val": 4, "test": 7}, (seed, counts)
        assert {it.split for it in out if it.meta["group"] in ("g0", "g1")} == {"train"}


@pytest.mark.parametrize("seed", range(4))
def test_a_large_group_does_not_swallow_val(seed):
    """av_films' three films (113, 29, 38 windows): in hash order the 113-window film can
    come first and fill val many times over, leaving 29 items to train."""
    out = assign_splits(_grouped_items([113, 29, 38]), 0.15, 0.2, seed)
    assert split_counts(out)["train"] == 113
    assert {it.split for it in out if it.meta["group"] == "g0"} == {"train"}
