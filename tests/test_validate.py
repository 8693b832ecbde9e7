"""Prepared datasets (save/load, data_version) and their great-expectations validation.

Bad-input tests plant one fault in a small real subset (40 items) and check that the
error names the items.jsonl file, the line of the faulty item, the field and the rule.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from cmr.data.prepare import Prepared, data_version, load_prepared, prepare_dataset, save_prepared
from cmr.data.validate import MediaBounds, raise_on_failure, validate_prepared
from cmr.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data" / "raw" / "openclipart_mini"
N_SMALL = 40


@pytest.fixture(scope="module", autouse=True)
def _great_expectations_imported():
    """Importing great-expectations takes 3-5 s once per process; pay it in setup, not in a test."""
    import great_expectations  # noqa: F401


@pytest.fixture(scope="module")
def mini() -> Prepared:
    return prepare_dataset("openclipart", DEFAULT_DATA, {}, 0.1, 0.15, 0)


@pytest.fixture(scope="module")
def wiki(shared_datasets) -> Prepared:
    return prepare_dataset("features_npz", shared_datasets / "wikipedia_cmr", {}, 0.1, 0.15, 0)


@pytest.fixture
def small(mini, tmp_path) -> Prepared:
    """The first 40 default-dataset items with their images copied to a folder we may damage."""
    items = mini.items[:N_SMALL]
    root = tmp_path / "media"
    for it in items:
        (root / it.image).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mini.root / it.image, root / it.image)
    return dataclasses.replace(mini, items=items, root=root)


@pytest.fixture
def small_features(wiki) -> Prepared:
    items = wiki.items[:N_SMALL]
    assert [it.feature_row for it in items] == list(range(N_SMALL))
    return dataclasses.replace(wiki, items=items, features={m: a[:N_SMALL].copy() for m, a in wiki.features.items()})


def _with(p: Prepared, k: int, **changes) -> Prepared:
    items = list(p.items)
    items[k] = dataclasses.replace(items[k], **changes)
    return dataclasses.replace(p, items=items)


def test_default_dataset_passes(mini):
    report = validate_prepared(mini, min_chars=2, max_chars=512)
    assert report["success"], [e for e in report["expectations"] if not e["success"]]
    assert report["n_items"] == len(mini.items) >= 1500 and report["n_failures"] == 0
    rules = {e["rule"] for e in report["expectations"]}
    assert {"ids unique", "image decodes", "texts non-empty", "labels in label_set", "no content shared across splits"} <= rules
    raise_on_failure(report, "unused")  # passes silently
    json.dumps(report)  # the stage writes it as JSON


def test_small_subsets_pass(small, small_features):
    assert validate_prepared(small, 2, 512)["success"]
    report = validate_prepared(small_features, 2, 512)
    assert report["success"]
    assert {"image feature dim == 128", "text feature dim == 10", "features finite"} <= {e["rule"] for e in report["expectations"]}


def _plant_leak(p: Prepared) -> tuple[Prepared, int]:
    i = next(k for k, it in enumerate(p.items) if it.split == "train")
    j = next(k for k, it in enumerate(p.items) if it.split != "train")
    return _with(p, j, texts=p.items[j].texts + (p.items[i].texts[0].upper(),)), min(i, j)


def _plant_undecodable(p: Prepared) -> tuple[Prepared, int]:
    path = p.root / p.items[9].image
    path.write_bytes(path.read_bytes()[:200])  # a JPEG cut short: the header parses, the pixels do not
    return p, 9


def _plant_nan(p: Prepared) -> tuple[Prepared, int]:
    p.features["image"][7, 3] = np.nan
    return p, 7


def _plant_wrong_dim(p: Prepared) -> tuple[Prepared, int]:
    return dataclasses.replace(p, features=p.features | {"text": p.features["text"][:, :9]}), 0


#: fault -> (fixture, planter returning (prepared, index of the first faulty item), field, rule)
FAULTS = {
    "duplicate id": ("small", lambda p: (_with(p, 5, id=p.items[2].id), 2), "id", "ids unique"),
    "missing image": ("small", lambda p: (_with(p, 4, image="images/animals/no_such.jpg"), 4), "image", "image file exists"),
    "undecodable image": ("small", _plant_undecodable, "image", "image decodes"),
    "missing audio": ("small", lambda p: (_with(p, 6, audio="sounds/no_such.ogg"), 6), "audio", "audio file exists"),
    "empty text": ("small", lambda p: (_with(p, 11, texts=("  ",)), 11), "texts", "texts non-empty"),
    "no text": ("small", lambda p: (_with(p, 12, texts=()), 12), "texts", "texts non-empty"),
    "too short text": ("small", lambda p: (_with(p, 13, texts=("a",)), 13), "texts", "text length >= 2"),
    "too long text": ("small", lambda p: (_with(p, 14, texts=("x" * 600,)), 14), "texts", "text length <= 512"),
    "unknown label": ("small", lambda p: (_with(p, 15, labels=("dinosaurs",)), 15), "labels", "labels in label_set"),
    "bad split": ("small", lambda p: (_with(p, 16, split="dev"), 16), "split", "split in train/val/test"),
    "leakage": ("small", _plant_leak, "split", "no content shared across splits"),
    "feature row out of range": ("small_features", lambda p: (_with(p, 3, feature_row=10_000), 3), "feature_row", "feature_row in range"),
    "non-finite feature": ("small_features", _plant_nan, "feature_row", "features finite"),
    "wrong feature dim": ("small_features", _plant_wrong_dim, "feature_row", "text feature dim == 10"),
    "declared feature array gone": (
        "small_features", lambda p: (dataclasses.replace(p, features={"image": p.features["image"]}), 0),
        "feature_row", "text feature dim == 10",
    ),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_bad_input_names_file_row_field_rule(fault, request, tmp_path):
    fixture, plant, field, rule = FAULTS[fault]
    bad, k = plant(request.getfixturevalue(fixture))
    report = validate_prepared(bad, min_chars=2, max_chars=512)
    assert not report["success"]
    failed = [e for e in report["expectations"] if not e["success"]]
    assert failed[0]["rule"] == rule, failed
    out = save_prepared(bad, tmp_path / "prepared")
    items_path = out / "items.jsonl"
    with pytest.raises(DataError) as err:
        raise_on_failure(report, items_path)
    msg = str(err.value)
    row = k + 1
    assert f"{items_path}:{row}: breaks rule '{rule}'" in msg, msg
    assert f"field '{field}'" in msg and "failure(s) in all" in msg
    line = items_path.read_text(encoding="utf-8").splitlines()[row - 1]
    assert json.loads(line)["id"] == failed[0]["unexpected"][0]["id"] == bad.items[k].id


def test_failures_are_all_counted(small, tmp_path):
    bad = _with(_with(small, 3, labels=("dinosaurs",)), 20, texts=("x" * 600,))
    report = validate_prepared(bad, 2, 512)
    assert report["n_failures"] == 2
    with pytest.raises(DataError, match=r":4: breaks rule 'labels in label_set'.*2 failure\(s\) in all"):
        raise_on_failure(report, tmp_path / "items.jsonl")


# ------------------------------------------------------------ prepare / save / load


def test_save_load_round_trip(mini, wiki, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = save_prepared(mini, tmp_path / "prepared")
    # origins.json: each item's line in the source, so errors found later name the user's file
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "items.jsonl", "origins.json"]
    assert json.loads((out / "dataset.json").read_text())["root"] == "data/raw/openclipart_mini"
    back = load_prepared(out)
    assert back.items == mini.items and back.label_set == mini.label_set and back.info == mini.info
    assert back.origins == mini.origins and back.origins[mini.items[0].id].endswith("items.jsonl:1")
    assert back.root.resolve() == DEFAULT_DATA.resolve() and back.features is None

    save_prepared(wiki, out)  # replaces the folder as a whole
    back = load_prepared(out)
    assert (out / "features.npz").is_file() and back.info["counts"] == wiki.info["counts"]
    for m in ("image", "text"):
        np.testing.assert_array_equal(back.features[m], wiki.features[m])
    assert back.info["feature_dims"] == {"image": 128, "text": 10}


def test_prepare_info_counts(mini):
    counts = mini.info["counts"]
    assert sum(counts.values()) == len(mini.items) and all(counts[s] > 0 for s in ("train", "val", "test"))
    assert mini.info["data_version"] == data_version(mini.items, mini.root, None)
    with pytest.raises(ConfigError, match="did you mean 'openclipart'"):
        prepare_dataset("openclipar", DEFAULT_DATA, {}, 0.1, 0.15, 0)


def test_data_version_tracks_items_media_and_features(small, small_features):
    v = data_version(small.items, small.root, None)
    assert v == data_version(list(small.items), small.root, None)
    assert v != data_version(_with(small, 0, texts=("another caption",)).items, small.root, None)
    path = small.root / small.items[0].image
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    assert v != data_version(small.items, small.root, None)
    f = small_features.features
    w = data_version(small_features.items, small_features.root, f)
    assert w != data_version(small_features.items, small_features.root, f | {"text": f["text"] * 1.0001})


def test_load_prepared_missing_folder(tmp_path):
    with pytest.raises(DataError, match="dataset.json: breaks rule 'file exists'"):
        load_prepared(tmp_path)


# ------------------------------------------------------------ sources too small, prepared files of the wrong types


@pytest.mark.parametrize("n_lines", [0, 3])
def test_too_small_source_fails_ingest_and_keeps_the_old_output(n_lines, small, tmp_path):
    from cmr.stages import ingest

    src = tmp_path / "src"
    src.mkdir()
    (src / "images").symlink_to(DEFAULT_DATA / "images")
    lines = (DEFAULT_DATA / "items.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:n_lines]
    (src / "items.jsonl").write_text("".join(lines), encoding="utf-8")
    out = save_prepared(small, tmp_path / "prepared")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rule = "at least one item" if n_lines == 0 else "every split (train, val, test) has at least one item"
    with pytest.raises(DataError, match=rf"{src}(/items\.jsonl)?: breaks rule '{re.escape(rule)}'") as err:
        ingest.run("openclipart", str(src), {}, 0.1, 0.15, 0, str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing replaced
    if n_lines:
        assert "3 item(s) read" in str(err.value) and "'val': 0" in str(err.value)
        # a split whose fraction is 0 may stay empty: train and the asked-for splits must hold an item
        assert prepare_dataset("openclipart", src, {}, 0.0, 0.0, 0).info["counts"] == {"train": 3, "val": 0, "test": 0}


@pytest.mark.parametrize(
    "field,value,rule",
    [("id", None, "id is a non-empty string"), ("texts", [5], "texts is a list of strings"),
     ("image", 5, "image is a string (a path) or null"), ("labels", "animals", "labels is a list of strings")],
)
def test_prepared_field_of_wrong_type_fails_validate(field, value, rule, small, tmp_path):
    from cmr.stages import validate

    out = save_prepared(small, tmp_path / "prepared")
    items_path = out / "items.jsonl"
    lines = items_path.read_text(encoding="utf-8").splitlines(keepends=True)
    row = json.loads(lines[6])
    item_id = row["id"]
    lines[6] = json.dumps(row | {field: value}) + "\n"
    items_path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(DataError) as err:
        validate.run(str(out), 2, 512, str(tmp_path / "report.json"))
    msg = str(err.value)
    assert msg.startswith(f"{items_path}:7: breaks rule '{rule}'"), msg
    assert f"field '{field}'" in msg and (field == "id" or repr(item_id) in msg)


def test_prepared_items_not_utf8(small, tmp_path):
    out = save_prepared(small, tmp_path / "prepared")
    with open(out / "items.jsonl", "ab") as f:
        f.write('{"id": "é"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"items\.jsonl:{N_SMALL + 1}: breaks rule 'UTF-8 text'"):
        load_prepared(out)


# ------------------------------------------------------------ audio and video

AV_SAMPLE = REPO / "data" / "raw" / "av_sample"
#: av_sample items kept for the tests: three Big Buck Bunny windows, two of the Sintel
#: trailer, five GRID utterances (rows 6-10; their clips are 3 s, the films' 2 s)
AV_ROWS = [0, 1, 2, 30, 31, 67, 68, 69, 70, 71]


@pytest.fixture(scope="module")
def av() -> Prepared:
    return prepare_dataset("av_films", AV_SAMPLE, {}, 0.1, 0.15, 0)


@pytest.fixture
def av_small(av, tmp_path) -> Prepared:
    """Ten av_sample items with their media copied to a folder we may damage."""
    items = [av.items[k] for k in AV_ROWS]
    root = tmp_path / "media"
    for it in items:
        for rel in (it.video, it.audio):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(av.root / rel, root / rel)
    return dataclasses.replace(av, items=items, root=root)


def test_av_items_pass_with_media_rules_and_no_text_rules(av_small, small):
    report = validate_prepared(av_small, 2, 512)
    assert report["success"], [e for e in report["expectations"] if not e["success"]]
    rules = {e["rule"] for e in report["expectations"]}
    assert {"video decodes", "video has >= 4 frames", "audio not silent (RMS >= -60.0 dBFS)",
            "audio sample rate in [4000, 192000] Hz", "video duration in [0.1, 600.0] s"} <= rules
    assert not any(r.startswith("text") for r in rules)
    image_text = {e["rule"] for e in validate_prepared(small, 2, 512)["expectations"]}
    assert "texts non-empty" in image_text and not any("video decodes" in r or "RMS" in r for r in image_text)


def _damage(p: Prepared, k: int, field: str, make) -> tuple[Prepared, int, MediaBounds]:
    path = p.root / getattr(p.items[k], field)
    make(path)
    return p, k, MediaBounds()


def _silence(path: Path) -> None:
    import soundfile

    data, rate = soundfile.read(path)
    soundfile.write(path, np.zeros_like(data), rate, subtype="PCM_16")


def _truncate(n_bytes: int):
    return lambda path: path.write_bytes(path.read_bytes()[:n_bytes])


#: fault -> (planter (prepared -> prepared, index of the first faulty item, bounds), field, rule)
AV_FAULTS = {
    "truncated video": (lambda p: _damage(p, 2, "video", _truncate(3000)), "video", "video decodes"),
    "corrupt audio": (lambda p: _damage(p, 1, "audio", _truncate(30)), "audio", "audio decodes"),
    "silent audio": (lambda p: _damage(p, 3, "audio", _silence), "audio", "audio not silent (RMS >= -60.0 dBFS)"),
    "too few frames": (lambda p: (p, 0, MediaBounds(min_video_frames=17)), "video", "video has >= 17 frames"),
    "sample rate too low": (lambda p: (p, 0, MediaBounds(min_sample_rate=22050)), "audio",
                            "audio sample rate in [22050, 192000] Hz"),
    "clip too long": (lambda p: (p, 5, MediaBounds(max_seconds=2.5)), "audio", "audio duration in [0.1, 2.5] s"),
}


@pytest.mark.parametrize("fault", sorted(AV_FAULTS))
def test_bad_media_names_file_row_field_rule(fault, av_small, tmp_path):
    plant, field, rule = AV_FAULTS[fault]
    assert validate_prepared(av_small, 2, 512)["success"]
    bad, k, bounds = plant(av_small)
    report = validate_prepared(bad, 2, 512, media=bounds)
    failed = [e for e in report["expectations"] if not e["success"]]
    assert failed and failed[0]["rule"] == rule, failed
    items_path = save_prepared(bad, tmp_path / "prepared") / "items.jsonl"
    with pytest.raises(DataError) as err:
        raise_on_failure(report, items_path)
    msg = str(err.value)
    assert f"{items_path}:{k + 1}: breaks rule '{rule}'" in msg, msg
    assert f"field '{field}' of item {bad.items[k].id!r}" in msg and getattr(bad.items[k], field) in msg
