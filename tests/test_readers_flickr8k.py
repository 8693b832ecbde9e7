"""The Flickr8k reader on the real set (both layouts) and on small hand-made copies of its
standard layout; the COCO reader with a caption file that covers more images than its folder."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from cmr.data.prepare import prepare_dataset
from cmr.data.readers import READERS
from cmr.data.splits import content_groups, content_keys, find_leakage
from cmr.errors import DataError

from test_readers import _make_coco

#: the byte-identical kayak photo under two Flickr ids (README), both in train
KAYAK = ("2851198725_37b6027625", "3050606344_af711c726c")


@pytest.fixture(scope="module")
def flickr8k(shared_datasets) -> Path:
    folder = shared_datasets / "flickr8k"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    return folder


def test_standard_layout_on_the_real_files(flickr8k):
    result = READERS.get("flickr8k")(flickr8k / "original")
    assert result.root == flickr8k / "images"
    assert Counter(it.split for it in result.items) == {"train": 6000, "val": 1000, "test": 1000}
    test = [it for it in result.items if it.split == "test"]
    # the published protocol: 1,000 test images x 5 captions, a caption repeated within an image kept twice
    assert sum(len(it.texts) for it in test) == 5000 and all(len(it.texts) == 5 for it in test)
    assert result.skipped == {
        "captions_without_image": 5,  # 2258277193_586949ec62.jpg.1 (#0) and .jpg (#1-#4): no such file
        "images_missing": 2,
        "images_in_no_split": 91,
        "train_captions_shared_with_a_later_split": 115,
        "val_captions_shared_with_a_later_split": 8,
    }
    first = result.items[0]
    assert first.id == "1000268201_693b08cb0e" and first.image == "1000268201_693b08cb0e.jpg"
    assert first.texts[0] == "A child in a pink dress is climbing up a set of stairs in an entry way ."
    # the kayak photo: one content group (the leakage rule), one split
    kayak = [i for i, it in enumerate(result.items) if it.id in KAYAK]
    groups = content_groups(content_keys([result.items[i] for i in kayak], result.root))
    assert len(kayak) == 2 and groups[0] == groups[1] and {result.items[i].split for i in kayak} == {"train"}


def test_both_layouts_give_the_same_items(flickr8k):
    standard = READERS.get("flickr8k")(flickr8k / "original")
    shared = READERS.get("flickr8k")(flickr8k)
    assert [(it.id, it.split, it.texts) for it in standard.items] == [(it.id, it.split, it.texts) for it in shared.items]
    assert all((shared.root / it.image).is_file() for it in shared.items[:50])
    # items.jsonl names only existing images: nothing missing, the rest counted alike
    assert shared.skipped == {k: v for k, v in standard.skipped.items() if "without_image" not in k and "missing" not in k}


def test_prepared_flickr8k_is_leak_free_and_reports_what_was_skipped(flickr8k):
    prepared = prepare_dataset("flickr8k", flickr8k, {}, 0.1, 0.15, 0)
    assert prepared.info["counts"] == {"train": 6000, "val": 1000, "test": 1000}
    assert prepared.info["n_texts"]["test"] == 5000
    assert prepared.info["skipped"]["images_in_no_split"] == 91
    assert find_leakage(prepared.items, prepared.root) == []
    kept = READERS.get("flickr8k")(flickr8k, keep_shared_captions=True)
    assert "train_captions_shared_with_a_later_split" not in kept.skipped
    # 82 normalised captions are shared by items of two source splits (123 copies were dropped above)
    assert len(find_leakage(kept.items, kept.root)) == 82


def _mini(flickr8k: Path, root: Path, token_lines: list[str], newline: str = "\n") -> Path:
    """A standard-layout copy of four real images: a, b train; c dev; d test."""
    ids = ["1000268201_693b08cb0e", "1001773457_577c3a7d70", "1002674143_1b742ab4b8", "1003163366_44323f5815"]
    (root / "Flicker8k_Dataset").mkdir(parents=True)
    for i in ids:
        shutil.copyfile(flickr8k / "images" / f"{i}.jpg", root / "Flicker8k_Dataset" / f"{i}.jpg")
    for name, part in (("train", ids[:2]), ("dev", ids[2:3]), ("test", ids[3:])):
        (root / f"Flickr_8k.{name}Images.txt").write_text("".join(f"{i}.jpg\n" for i in part))
    (root / "Flickr8k.token.txt").write_bytes(newline.join(token_lines).encode() + newline.encode())
    return root


def test_mini_layout_skips_counts_and_shared_captions(flickr8k, tmp_path):
    lines = [
        "1000268201_693b08cb0e.jpg#1\tA girl .",
        "1000268201_693b08cb0e.jpg#0\tA dog runs .",  # also in the test item: dropped from train
        "1001773457_577c3a7d70.jpg#0 Two dogs .",  # a space instead of the TAB, as in some copies
        "1002674143_1b742ab4b8.jpg#0\tA street .",
        "1003163366_44323f5815.jpg#0\ta dog  runs .",  # same caption after case folding and spaces
        "9999999999_missing.jpg#0\tNo such photo .",
        "9999999999_missing.jpg#1\tStill none .",
    ]
    result = READERS.get("flickr8k")(_mini(flickr8k, tmp_path, lines, "\r\n"))
    by_id = {it.id: it for it in result.items}
    assert by_id["1000268201_693b08cb0e"].texts == ("A girl .",)  # '#0' would come first, it was dropped
    assert by_id["1001773457_577c3a7d70"].texts == ("Two dogs .",)
    assert by_id["1003163366_44323f5815"].texts == ("a dog  runs .",)
    assert [by_id[i].split for i in sorted(by_id)] == ["train", "train", "val", "test"]
    assert result.skipped == {"captions_without_image": 2, "images_missing": 1,
                              "train_captions_shared_with_a_later_split": 1}
    kept = READERS.get("flickr8k")(tmp_path, keep_shared_captions=True)
    assert {it.id: it.texts for it in kept.items}["1000268201_693b08cb0e"] == ("A dog runs .", "A girl .")


def test_mini_layout_bad_input(flickr8k, tmp_path):
    root = _mini(flickr8k, tmp_path / "a", ["1000268201_693b08cb0e.jpg#0\tfine", "1001773457_577c3a7d70.jpg\tno number"])
    with pytest.raises(DataError, match=r"Flickr8k\.token\.txt:2: breaks rule '<image file>#<n><TAB><caption>'"):
        READERS.get("flickr8k")(root)
    root = _mini(flickr8k, tmp_path / "b", ["1000268201_693b08cb0e.jpg#0\tfine"])
    shutil.rmtree(root / "Flicker8k_Dataset")
    with pytest.raises(DataError, match="image folder exists"):
        READERS.get("flickr8k")(root)
    root = _mini(flickr8k, tmp_path / "c", ["1000268201_693b08cb0e.jpg#0\tfine"])
    (root / "Flickr_8k.testImages.txt").write_text("1000268201_693b08cb0e.jpg\n")
    with pytest.raises(DataError, match=r"testImages\.txt:1: breaks rule 'each image in one split list'"):
        READERS.get("flickr8k")(root)
    root = _mini(flickr8k, tmp_path / "d", ["9999999999_missing.jpg#0\tnone"])
    with pytest.raises(DataError, match="at least one captioned image"):
        READERS.get("flickr8k")(root)
    root = tmp_path / "e"
    root.mkdir()
    (root / "items.jsonl").write_text(json.dumps({"id": "x", "image": "x.jpg", "texts": ["a"], "split": "validation"}) + "\n")
    with pytest.raises(DataError, match=r"items\.jsonl:1: breaks rule 'split is train, dev, test or null'"):
        READERS.get("flickr8k")(root)


def test_coco_caption_file_covering_more_images_than_the_folder(shared_datasets, tmp_path):
    root = _make_coco(shared_datasets, tmp_path)
    (root / "train2017" / "000000000002.jpg").unlink()  # image 102 has two captions
    result = READERS.get("coco")(root)
    assert [it.id for it in result.items] == ["train2017/101", "train2017/103", "val2017/101", "val2017/102"]
    assert result.skipped == {"images_missing": 1, "captions_without_image": 2}
    for folder in ("train2017", "images/val2017"):
        for f in (root / folder).iterdir():
            f.unlink()
    with pytest.raises(DataError, match=r"annotations: breaks rule 'at least one captioned image exists"):
        READERS.get("coco")(root)
