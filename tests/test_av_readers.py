"""Audio and video readers on the real shared datasets and the embedded av_sample: counts
from the READMEs, grouping (a recording, a film, a picture stays in one split), the
FSDD pairing rules."""
from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from cmr.data.readers import READERS
from cmr.data.splits import assign_splits, find_leakage, split_counts
from cmr.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
AV_SAMPLE = REPO / "data" / "raw" / "av_sample"


def _splits_of_groups(items) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for it in items:
        out[it.meta["group"]].add(it.split)
    return out


def test_av_films_one_film_one_group(shared_datasets):
    result = READERS.get("av_films")(shared_datasets / "av_films")
    assert len(result.items) == 180  # README: agent327 113, bbb_0_60 29, sintel_trailer 25, sintel_excerpt 13
    assert Counter(it.meta["recording"] for it in result.items) == {
        "agent327": 113, "bbb_0_60": 29, "sintel_trailer": 25, "sintel_excerpt": 13}
    assert Counter(it.meta["group"] for it in result.items) == {"agent327": 113, "big_buck_bunny": 29, "sintel": 38}
    assert all(it.video and it.audio and not it.texts and not it.image for it in result.items)
    for seed in range(3):
        items = assign_splits(result.items, 0.1, 0.15, seed, root=result.root)
        assert all(len(s) == 1 for s in _splits_of_groups(items).values())
    films = READERS.get("av_films")(shared_datasets / "av_films", recordings=["bbb_0_60", "sintel_excerpt"])
    assert len(films.items) == 42
    with pytest.raises(ConfigError, match=r"recording \['sintel'\] not in the source"):
        READERS.get("av_films")(shared_datasets / "av_films", recordings=["sintel"])


def test_av_clips_small_grid_transcripts_in_meta(shared_datasets):
    result = READERS.get("av_clips_small")(shared_datasets / "av_clips_small")
    assert len(result.items) == 31
    grid = {it.id: it for it in result.items if it.meta["recording"].startswith("grid_")}
    assert len(grid) == 11 and len({it.meta["group"] for it in grid.values()}) == 11
    assert grid["grid_bbaf2n"].meta["transcript"] == "bin blue at f two now"
    assert not any(it.texts for it in result.items)
    assert sum("transcript" in it.meta for it in result.items) == 11
    assert Counter(it.meta["group"] for it in result.items)["big_buck_bunny"] == 15


def test_embedded_sample_is_a_faithful_licensed_subset(shared_datasets):
    result = READERS.get("av_films")(AV_SAMPLE)
    assert len(result.items) == 78
    assert Counter(it.meta["group"] for it in result.items if not it.id.startswith("grid_")) == {
        "big_buck_bunny": 29, "sintel": 38}
    assert not any("agent327" in it.id or "agent327" in it.meta["recording"] for it in result.items)
    size = sum(p.stat().st_size for p in AV_SAMPLE.rglob("*") if p.is_file())
    assert size < 8 * 2**20
    readme = (AV_SAMPLE / "README.md").read_text(encoding="utf-8")
    assert "(c) copyright Blender Foundation | www.bigbuckbunny.org / www.sintel.org" in readme
    assert "Cooke" in readme and "CC BY 4.0" in readme
    for it in result.items[::7]:  # files are the shared ones, byte for byte
        source = "av_clips_small" if it.id.startswith("grid_") else "av_films"
        for rel in (it.video, it.audio):
            assert hashlib.sha256((AV_SAMPLE / rel).read_bytes()).digest() == \
                hashlib.sha256((shared_datasets / source / rel).read_bytes()).digest()


def test_embedded_sample_splits_are_non_empty_and_grouped():
    result = READERS.get("av_films")(AV_SAMPLE)
    items = assign_splits(result.items, 0.1, 0.15, 0, root=result.root)
    assert split_counts(items) == {"train": 67, "val": 4, "test": 7}
    assert all(len(s) == 1 for s in _splits_of_groups(items).values())
    assert not find_leakage(items, result.root)


def test_gcompris_spoken_words_groups_by_picture(shared_datasets):
    result = READERS.get("gcompris_spoken_words")(shared_datasets / "gcompris_spoken_words")
    assert len(result.items) == 563 and len(result.label_set) == 107
    assert Counter(it.meta["lang"] for it in result.items) == {
        "fr": 102, "de": 102, "es": 85, "ro": 64, "gd": 63, "en": 59, "ca": 44, "pt_BR": 44}
    color = next(it for it in result.items if it.id == "en/color")
    assert (color.texts, color.labels, color.image, color.audio) == (("color",), ("color",), "images/color.jpg", "audio/en/color.ogg")
    items = assign_splits(result.items, 0.1, 0.15, 0, root=result.root)
    assert all(len(s) == 1 for s in _splits_of_groups(items).values())
    assert min(split_counts(items).values()) > 0
    english = READERS.get("gcompris_spoken_words")(shared_datasets / "gcompris_spoken_words", langs=["en"])
    assert len(english.items) == 59 and len({it.image for it in english.items}) == 59


def test_fsdd_digits_pairs_each_image_with_its_own_recording(shared_datasets):
    src = shared_datasets / "fsdd_digits"
    result = READERS.get("fsdd_digits")(src)
    rows = [json.loads(line) for line in (src / "items.jsonl").open(encoding="utf-8")]
    digit_of = {r["image"] or r["audio"]: r["label"] for r in rows}
    assert len(result.items) == 1797  # every image, once
    assert len({it.image for it in result.items}) == 1797 and len({it.audio for it in result.items}) == 1797
    for it in result.items:
        assert it.labels == (str(digit_of[it.image]),) == (str(digit_of[it.audio]),)
        assert Path(it.audio).stem.split("_")[0] == it.labels[0]  # recordings are named <digit>_<speaker>_<take>
        assert it.split == ("test" if it.meta["take"] < 5 else "train") == it.meta["fsdd_split"]
    assert split_counts(result.items) == {"train": 1497, "val": 0, "test": 300}  # all 300 test takes used
    again = READERS.get("fsdd_digits")(src)
    assert [(it.image, it.audio) for it in again.items] == [(it.image, it.audio) for it in result.items]
    other = READERS.get("fsdd_digits")(src, seed=1)
    assert sum(a.audio != b.audio for a, b in zip(result.items, other.items)) > 1500
    unsplit = READERS.get("fsdd_digits")(src, keep_source_split=False)
    assert {it.split for it in unsplit.items} == {""}


@pytest.mark.parametrize("name,source,options,count", [
    ("tuxpaint_sounds", "tuxpaint", {}, 134),
    ("tuxpaint_sounds", "tuxpaint", {"audio_field": "spoken_en"}, 65),
    ("gcompris_sounds", "gcompris", {}, 44),
])
def test_sound_readers_keep_image_audio_pairs(name, source, options, count, shared_datasets):
    result = READERS.get(name)(shared_datasets / source, **options)
    assert len(result.items) == count
    assert all(it.image and it.audio and it.texts for it in result.items)
    full = READERS.get(source)(shared_datasets / source, **options)
    assert {it.id for it in result.items} == {it.id for it in full.items if it.audio}
    assert set(result.label_set) == {label for it in result.items for label in it.labels}
