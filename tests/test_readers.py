"""Dataset readers on the real shared datasets (COCO / Karpathy files are built in tmp_path
from real openclipart images and titles), and the embedded default dataset."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from cmr.data.readers import READERS, ReadResult, is_collection_title
from cmr.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data" / "raw" / "openclipart_mini"


def _openclipart_rows(shared: Path, n: int) -> list[dict]:
    """The first n openclipart rows with a title that is not a collection name."""
    rows = [json.loads(line) for line in (shared / "openclipart" / "items.jsonl").open(encoding="utf-8")]
    return [r for r in rows if r["title"] and not is_collection_title(r["title"])][:n]


def _make_coco(shared: Path, root: Path) -> Path:
    """COCO captions layout: annotations/captions_{train,val}2017.json + train2017/, images/val2017/."""
    rows = _openclipart_rows(shared, 7)
    (root / "annotations").mkdir(parents=True)
    for name, part, image_dir in (("train2017", rows[:4], "train2017"), ("val2017", rows[4:], "images/val2017")):
        (root / image_dir).mkdir(parents=True)
        images, annotations = [], []
        for k, r in enumerate(part):
            file_name = f"{k:012d}.jpg"
            shutil.copyfile(shared / "openclipart" / r["image"], root / image_dir / file_name)
            images.append({"id": 100 + k, "file_name": file_name, "width": r["width"], "height": r["height"]})
            # annotation ids out of order on purpose: texts must come back in annotation-id order
            if k > 0:  # the first image of each file gets no caption and must be skipped
                annotations.append({"id": 2 * k + 1, "image_id": 100 + k, "caption": r["keywords"][0] if r["keywords"] else "x"})
                annotations.append({"id": 2 * k, "image_id": 100 + k, "caption": f"  {r['title']} "})
        (root / "annotations" / f"captions_{name}.json").write_text(
            json.dumps({"images": images, "annotations": annotations}), encoding="utf-8"
        )
    return root


def _make_karpathy(shared: Path, root: Path) -> Path:
    rows = _openclipart_rows(shared, 5)
    splits = ["train", "restval", "val", "test", "train"]
    images = []
    for k, (r, split) in enumerate(zip(rows, splits)):
        folder = root / "imgs" / ("val2014" if k % 2 else "train2014")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared / "openclipart" / r["image"], folder / f"{k}.jpg")
        sentences = [{"raw": r["title"], "tokens": r["title"].lower().split()}]
        if r["description"]:
            sentences.append({"raw": r["description"]})
        images.append({"filepath": folder.name, "filename": f"{k}.jpg", "imgid": k, "split": split, "sentences": sentences})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}), encoding="utf-8")
    return root


def _make_reid_raw(shared: Path, root: Path) -> Path:
    """CUHK-PEDES reid_raw.json built from the sample's caption files and images (tmp only)."""
    sample = shared / "cuhk_pedes_sample"
    entries = json.loads((sample / "captions" / "caption_val.json").read_text(encoding="utf-8"))
    merged: dict[str, dict] = {}
    for e in entries:
        if (sample / "images" / e["file_path"]).is_file():
            m = merged.setdefault(e["file_path"], {"file_path": e["file_path"], "id": e["id"], "captions": [], "split": "val"})
            m["captions"].append(e["captions"])
    reid = list(merged.values())[:6]
    reid[0]["captions_bt"] = [reid[0]["captions"][0].upper()]
    for e in reid:
        (root / "imgs" / e["file_path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample / "images" / e["file_path"], root / "imgs" / e["file_path"])
    (root / "reid_raw.json").write_text(json.dumps(reid), encoding="utf-8")
    return root


#: reader -> (source builder, options) for the registry-wide test
SOURCES = {
    "openclipart": (lambda s, t: s / "openclipart", {}),
    "tuxpaint": (lambda s, t: s / "tuxpaint", {}),
    "gcompris": (lambda s, t: s / "gcompris", {}),
    "coco": (lambda s, t: _make_coco(s, t), {}),
    "karpathy": (lambda s, t: _make_karpathy(s, t), {"image_root": "imgs"}),
    "features_npz": (lambda s, t: s / "wikipedia_cmr", {}),
    "features_mat": (lambda s, t: s / "wikipedia_cmr" / "original", {}),
    "cuhk_pedes": (lambda s, t: s / "cuhk_pedes_sample", {"skip_missing_images": True}),
    "av_films": (lambda s, t: s / "av_films", {}),
    "av_clips_small": (lambda s, t: s / "av_clips_small", {}),
    "gcompris_spoken_words": (lambda s, t: s / "gcompris_spoken_words", {}),
    "fsdd_digits": (lambda s, t: s / "fsdd_digits", {}),
    "tuxpaint_sounds": (lambda s, t: s / "tuxpaint", {}),
    "gcompris_sounds": (lambda s, t: s / "gcompris", {}),
    # the generic reader on a file with its own field names (Flickr8k: texts list, split 'dev')
    "table": (lambda s, t: s / "flickr8k" / "items.jsonl", {"texts": ["texts"], "split": "split"}),
    "flickr8k": (lambda s, t: _needs(s / "flickr8k") / "original", {}),
}


def _needs(folder: Path) -> Path:
    if not folder.is_dir():
        pytest.skip(f"{folder} not found (set CMR_SHARED_DATASETS)")
    return folder


def test_every_reader_has_a_test_source():
    assert sorted(SOURCES) == READERS.names()


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_reader_contract(name, shared_datasets, tmp_path):
    build, options = SOURCES[name]
    result = READERS.get(name)(build(shared_datasets, tmp_path), **options)
    assert isinstance(result, ReadResult) and result.items
    assert len({it.id for it in result.items}) == len(result.items)
    assert {it.split for it in result.items} <= {"", "train", "val", "test"}
    assert {label for it in result.items for label in it.labels} <= set(result.label_set)
    for it in result.items:
        for rel in (it.image, it.audio, it.video):
            assert rel is None or (result.root / rel).is_file(), (it.id, rel)
        # every item pairs two modalities at least (texts count as one; a feature row holds two)
        modalities = [m for m in (it.image, it.audio, it.video) if m] + ["text"] * bool(it.texts)
        assert len(modalities) >= 2 or it.feature_row is not None, it.id
        assert all(t.strip() for t in it.texts)
    if result.features:
        rows = sorted(it.feature_row for it in result.items)
        assert rows == list(range(len(result.items)))
        assert all(a.shape[0] == len(result.items) and a.ndim == 2 for a in result.features.values())


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_unknown_option_is_a_config_error(name, shared_datasets, tmp_path):
    with pytest.raises(ConfigError, match="unknown option 'no_such_option'"):
        READERS.get(name)(tmp_path, no_such_option=1)


def test_openclipart_collection_titles_and_labels(shared_datasets):
    src = shared_datasets / "openclipart"
    everything = READERS.get("openclipart")(src, keep_collection_titles=True)
    kept = READERS.get("openclipart")(src)
    assert len(everything.items) == 6843  # README count
    titles = {it.texts[0] for it in kept.items}
    for name in ("gramastar", "Lemon SVG theme", "card", "AIGA_Symbol_Signs"):
        assert name not in titles
    assert not any(t.startswith(("Part of the Flat Icon Collection", "Clipart by Nicu Buculei - ")) for t in titles)
    # README: 1,375 + 773 + 411 + 226 + 122 items carry the five best-known collection titles alone
    assert len(everything.items) - len(kept.items) >= 1375 + 773 + 411 + 226 + 122
    frog = next(it for it in kept.items if it.id == "animals/2_dead_frogs_lumen_desig_01")
    assert frog.texts == ("2 dead frogs", "2 dead frogs... nothing more...")
    assert frog.labels == ("animals", "signs_and_symbols")  # also linked under signs_and_symbols/hazard
    assert len(kept.label_set) == 22
    assert not any("@" in t and " " not in t for it in kept.items for t in it.texts[1:])  # e-mail descriptions


def test_openclipart_malformed_line_names_file_and_line(tmp_path):
    lines = (DEFAULT_DATA / "items.jsonl").read_text(encoding="utf-8").splitlines()[:3]
    (tmp_path / "items.jsonl").write_text("\n".join([lines[0], lines[1][:-5], lines[2]]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"items\.jsonl:2: breaks rule 'valid JSON'"):
        READERS.get("openclipart")(tmp_path)


def test_tuxpaint_texts_and_audio(shared_datasets):
    src = shared_datasets / "tuxpaint"
    result = READERS.get("tuxpaint")(src)
    by_id = {it.id: it for it in result.items}
    assert len(by_id) == 950 and len(result.label_set) == 16
    assert by_id["animals/amphibians/frog"].texts == ("A frog.",)
    assert by_id["animals/amphibians/frog"].labels == ("animals",)
    assert sum(it.audio is not None for it in result.items) == 134  # README: 134 sound effects
    spoken = READERS.get("tuxpaint")(src, audio_field="spoken_en")
    assert sum(it.audio is not None for it in spoken.items) == 65
    with pytest.raises(ConfigError, match="audio_field"):
        READERS.get("tuxpaint")(src, audio_field="speech")


def test_gcompris_texts_labels_audio(shared_datasets):
    result = READERS.get("gcompris")(shared_datasets / "gcompris")
    assert len(result.items) == 224
    assert result.label_set == sorted(
        ["instruments", "explore_farm_animals", "explore_world_music", "explore_world_animals", "explore_monuments", "lang_words_sample"]
    )
    assert sum(it.audio is not None for it in result.items) == 26 + 9 + 9
    raw = [json.loads(line) for line in (shared_datasets / "gcompris" / "items.jsonl").open(encoding="utf-8")]
    for r, it in zip(raw, result.items):
        assert it.texts == tuple(dict.fromkeys(t for t in (r["text"], r["title"], r["text2"]) if t))


def test_coco_captions(shared_datasets, tmp_path):
    result = READERS.get("coco")(_make_coco(shared_datasets, tmp_path))
    assert [it.id for it in result.items] == ["train2017/101", "train2017/102", "train2017/103", "val2017/101", "val2017/102"]
    assert [it.split for it in result.items] == ["train"] * 3 + ["val"] * 2
    rows = _openclipart_rows(shared_datasets, 7)
    first = result.items[0]
    assert first.texts[0] == rows[1]["title"]  # annotation id 2 before 3, whitespace stripped
    assert first.image == "train2017/000000000001.jpg"
    assert result.items[3].image == "images/val2017/000000000001.jpg"


def test_coco_bad_split_name(shared_datasets, tmp_path):
    root = _make_coco(shared_datasets, tmp_path)
    (root / "annotations" / "captions_train2017.json").rename(root / "annotations" / "captions_extra2017.json")
    with pytest.raises(DataError, match="captions_extra2017.json: breaks rule 'split named"):
        READERS.get("coco")(root)


def test_karpathy_splits(shared_datasets, tmp_path):
    root = _make_karpathy(shared_datasets, tmp_path)
    result = READERS.get("karpathy")(root, image_root="imgs")
    assert [it.split for it in result.items] == ["train", "train", "val", "test", "train"]
    assert result.items[1].meta == {"karpathy_split": "restval"}
    assert result.items[1].image == "val2014/1.jpg" and result.root == root / "imgs"
    rows = _openclipart_rows(shared_datasets, 5)
    assert result.items[0].texts[0] == rows[0]["title"]
    # given the JSON file itself, the default image root is its folder
    assert READERS.get("karpathy")(root / "dataset_coco.json").root == root


def test_features_npz_equals_features_mat(shared_datasets):
    """The .npz is a conversion of the .mat + .list files: both readers must agree exactly."""
    npz = READERS.get("features_npz")(shared_datasets / "wikipedia_cmr")
    mat = READERS.get("features_mat")(shared_datasets / "wikipedia_cmr" / "original" / "raw_features.mat")
    assert npz.label_set == mat.label_set == ["art", "biology", "geography", "history", "literature",
                                               "media", "music", "royalty", "sport", "warfare"]
    for m in ("image", "text"):
        np.testing.assert_array_equal(npz.features[m], mat.features[m])
    assert [(it.id, it.split, it.labels, it.meta) for it in npz.items] == [
        (it.id, it.split, it.labels, it.meta) for it in mat.items
    ]
    raw = [json.loads(line) for line in (shared_datasets / "wikipedia_cmr" / "items.jsonl").open(encoding="utf-8")]
    assert [(r["id"], r["category"]) for r in raw] == [(it.id, it.labels[0]) for it in npz.items]
    assert npz.features["image"].shape == (2866, 128) and npz.features["text"].shape == (2866, 10)


def test_features_npz_partial_modalities(shared_datasets):
    src = shared_datasets / "pascal_sentence_partial"
    with pytest.raises(DataError, match="'train_image' is missing"):
        READERS.get("features_npz")(src)
    test_only = READERS.get("features_npz")(src, splits=["test"])
    assert len(test_only.items) == 100
    assert test_only.features["image"].shape == (100, 4096) and test_only.features["text"].shape == (100, 300)
    assert test_only.label_set == [str(k) for k in range(20)]  # numeric order


def test_cuhk_pedes_caption_files(shared_datasets):
    src = shared_datasets / "cuhk_pedes_sample"
    with pytest.raises(DataError, match=r"caption_test\.json:\[\d+\]: breaks rule 'image exists'"):
        READERS.get("cuhk_pedes")(src)
    result = READERS.get("cuhk_pedes")(src, skip_missing_images=True)
    raw = [json.loads(line) for line in (src / "items.jsonl").open(encoding="utf-8")]
    assert len(result.items) == len(raw) == 36
    by_key = {(it.id.split("/", 1)[0], it.image): it for it in result.items}
    for r in raw:
        it = by_key[(Path(r["source_file"]).stem, r["image"])]
        assert it.texts == tuple(r["captions"]) and it.split == r["split"]
        assert it.identity == f"{Path(r['source_file']).stem}:{r['person_id']}"
    old = READERS.get("cuhk_pedes")(src, caption_files=["caption_val.json"], skip_missing_images=True)
    assert len(old.items) == 16 and {it.split for it in old.items} == {"val"}


def test_cuhk_pedes_reid_raw(shared_datasets, tmp_path):
    root = _make_reid_raw(shared_datasets, tmp_path)
    result = READERS.get("cuhk_pedes")(root / "reid_raw.json")
    reid = json.loads((root / "reid_raw.json").read_text(encoding="utf-8"))
    assert [it.identity for it in result.items] == [str(e["id"]) for e in reid]
    assert [it.texts for it in result.items] == [tuple(e["captions"]) for e in reid]
    assert result.items[0].meta == {"captions_bt": reid[0]["captions_bt"]}
    assert result.items[0].image == f"imgs/{reid[0]['file_path']}"
    assert all(len(it.texts) == 2 for it in result.items)


# ------------------------------------------------------------ the embedded default dataset


def test_default_dataset_is_a_faithful_subset(shared_datasets):
    source = shared_datasets / "openclipart"
    result = READERS.get("openclipart")(DEFAULT_DATA)
    assert 1500 <= len(result.items) <= 2400
    assert len(result.label_set) >= 10
    lines = (DEFAULT_DATA / "items.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(result.items)  # no collection title was left to drop
    assert set(lines) <= set((source / "items.jsonl").read_text(encoding="utf-8").splitlines())
    files = [p for p in DEFAULT_DATA.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert len(files) == len(lines) + 2  # images + items.jsonl + README.md
    for it in result.items:
        ours, theirs = (DEFAULT_DATA / it.image).read_bytes(), (source / it.image).read_bytes()
        assert hashlib.sha256(ours).digest() == hashlib.sha256(theirs).digest(), it.id
    readme = (DEFAULT_DATA / "README.md").read_text(encoding="utf-8")
    assert "Public Domain Dedication" in readme and f"{len(lines):,} items" in readme


def test_default_dataset_selection_is_reproducible(shared_datasets):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_default_dataset
    finally:
        sys.path.remove(str(REPO / "scripts"))
    ids = make_default_dataset.select(shared_datasets / "openclipart", per_category=220, min_chars=2, max_chars=512)
    committed = [json.loads(line)["id"] for line in (DEFAULT_DATA / "items.jsonl").open(encoding="utf-8")]
    assert ids == committed


# ------------------------------------------------------------ bad source files


def _items_jsonl(src: Path, tmp_path: Path, n: int, **changes) -> Path:
    """``tmp_path/items.jsonl``: the first n rows of ``src/items.jsonl``, with ``changes`` applied to row 2."""
    rows = [json.loads(line) for line in (src / "items.jsonl").read_text(encoding="utf-8").splitlines()[:n]]
    rows[1].update(changes)
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return tmp_path


#: (reader, field, wrong value, expected type named by the rule)
WRONG_TYPES = [
    ("openclipart", "title", ["a"], "a string"),
    ("openclipart", "description", 5, "a string"),
    ("openclipart", "category", ["a"], "a string"),
    ("openclipart", "image", 7, "a string"),
    ("openclipart", "id", 12345, "a string"),
    ("openclipart", "also_linked_as", "foo/bar", "a list of strings"),
    ("openclipart", "keywords", "frog", "a list of strings"),
    ("tuxpaint", "text_en", ["A frog."], "a string"),
    ("tuxpaint", "sound", 5, "a string"),
    ("gcompris", "set", ["instruments"], "a string"),
    ("gcompris", "title", {"en": "x"}, "a string"),
]


@pytest.mark.parametrize("name,field,value,expected", WRONG_TYPES, ids=[f"{r}-{f}" for r, f, _, _ in WRONG_TYPES])
def test_wrong_field_type_names_file_line_field_and_type(name, field, value, expected, shared_datasets, tmp_path):
    src = DEFAULT_DATA if name == "openclipart" else shared_datasets / name
    _items_jsonl(src, tmp_path, 3, **{field: value})
    with pytest.raises(DataError, match=rf"items\.jsonl:2: breaks rule 'field '{field}' is {expected}'"):
        READERS.get(name)(tmp_path)


def _caption_file(shared: Path, tmp_path: Path, change) -> Path:
    """A cuhk_pedes caption-files source with 4 real entries; ``change(entries)`` plants a fault."""
    sample = shared / "cuhk_pedes_sample"
    entries = json.loads((sample / "captions" / "caption_val.json").read_text(encoding="utf-8"))
    entries = [e for e in entries if (sample / "images" / e["file_path"]).is_file()][:4]
    change(entries)
    (tmp_path / "captions").mkdir(parents=True)
    (tmp_path / "images").symlink_to(sample / "images")
    (tmp_path / "captions" / "caption_val.json").write_text(json.dumps(entries), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(
    "change,rule",
    [
        (lambda es: es.__setitem__(2, [1, 2]), "each entry is a JSON object"),
        (lambda es: es[2].update(file_path=5), "field 'file_path' is a string"),
        (lambda es: es[2].update(id=[7]), "field 'id' is an integer or a string"),
        (lambda es: es[2].update(captions=5), "field 'captions' is a string or a list"),
        (lambda es: es[2].update(split="dev"), "split in train/val/test"),  # named here, not only as an item later
    ],
    ids=["entry not an object", "file_path", "id", "captions", "split"],
)
def test_cuhk_pedes_bad_entry_names_file_and_entry(change, rule, shared_datasets, tmp_path):
    src = _caption_file(shared_datasets, tmp_path, change)
    with pytest.raises(DataError, match=rf"caption_val\.json:\[2\]: breaks rule '{re.escape(rule)}"):
        READERS.get("cuhk_pedes")(src)


def test_coco_and_karpathy_wrong_types(shared_datasets, tmp_path):
    coco = _make_coco(shared_datasets, tmp_path / "coco")
    path = coco / "annotations" / "captions_train2017.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["annotations"][1]["caption"] = ["a caption"]
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(DataError, match=r"captions_train2017\.json:annotations\[1\]: breaks rule 'field 'caption' is a string'"):
        READERS.get("coco")(coco)
    karpathy = _make_karpathy(shared_datasets, tmp_path / "karpathy")
    path = karpathy / "dataset_coco.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["images"][3]["sentences"] = ["a sentence"]
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(DataError, match=r"dataset_coco\.json:images\[3\]\.sentences\[0\]: breaks rule 'each entry is a JSON object'"):
        READERS.get("karpathy")(karpathy)


def test_features_npz_labels_out_of_range(shared_datasets, tmp_path):
    with np.load(shared_datasets / "wikipedia_cmr" / "wikipedia_cmr.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["test_label"][7] = 10  # categories has 10 names: 0..9
    np.savez(tmp_path / "w.npz", **arrays)
    with pytest.raises(DataError, match=r"w\.npz: breaks rule 'labels are integers 0\.\.C-1': 'test_label' holds 10, C = 10"):
        READERS.get("features_npz")(tmp_path)


def test_not_utf8_names_file_line_and_rule(shared_datasets, tmp_path):
    text = "".join((DEFAULT_DATA / "items.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:3])
    (tmp_path / "items.jsonl").write_bytes(text.encode("utf-16"))
    with pytest.raises(DataError, match=r"items\.jsonl:1: breaks rule 'UTF-8 text'"):
        READERS.get("openclipart")(tmp_path)
    lines = text.encode("utf-8").splitlines(keepends=True)
    (tmp_path / "items.jsonl").write_bytes(lines[0] + lines[1] + b'{"id": "\xe9\xff"}\n')  # Latin-1, not UTF-8
    with pytest.raises(DataError, match=r"items\.jsonl:3: breaks rule 'UTF-8 text'"):
        READERS.get("openclipart")(tmp_path)
    src = _caption_file(shared_datasets, tmp_path / "pedes", lambda es: None)
    path = src / "captions" / "caption_val.json"
    path.write_bytes(path.read_text(encoding="utf-8").encode("utf-16"))
    with pytest.raises(DataError, match=r"caption_val\.json:1: breaks rule 'UTF-8 text'"):
        READERS.get("cuhk_pedes")(src)


def test_empty_items_jsonl(tmp_path):
    (tmp_path / "items.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"items\.jsonl: breaks rule 'at least one item': the file is empty"):
        READERS.get("openclipart")(tmp_path)


def test_option_of_wrong_type_is_a_config_error(shared_datasets):
    src = shared_datasets / "cuhk_pedes_sample"
    with pytest.raises(ConfigError, match=r"option caption_files='caption_val\.json' must be a list of strings"):
        READERS.get("cuhk_pedes")(src, caption_files="caption_val.json")
    with pytest.raises(ConfigError, match="option keep_collection_titles='no' must be a boolean"):
        READERS.get("openclipart")(DEFAULT_DATA, keep_collection_titles="no")
    with pytest.raises(ConfigError, match="option splits='test' must be a list of strings or null"):
        READERS.get("features_npz")(shared_datasets / "pascal_sentence_partial", splits="test")
