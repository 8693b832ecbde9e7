"""Bad rows in a user's source: never dropped silently; errors name the source file and line;
``data.on_invalid: drop`` removes and lists them so the pipeline can go on."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from cmr.data.prepare import load_prepared, prepare_dataset
from cmr.errors import DataError
from cmr.stages import ingest, validate

from conftest import DEFAULT_DATA
from test_readers import _make_coco, _make_karpathy


@pytest.fixture(scope="module", autouse=True)
def _great_expectations_imported():
    import great_expectations  # noqa: F401


def _source(tmp_path: Path, edit: dict[int, dict]) -> Path:
    """The first 30 rows of the embedded default (images copied), row ``n`` (1-based) updated by ``edit[n]``."""
    rows = [json.loads(line) for line in (DEFAULT_DATA / "items.jsonl").read_text().splitlines()[:30]]
    src = tmp_path / "src"
    for r in rows:
        (src / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DEFAULT_DATA / r["image"], src / r["image"])
    for n, change in edit.items():
        rows[n - 1].update(change)
    (src / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return src


def _ingest_and_validate(tmp_path, src, on_invalid="fail", reader="openclipart", options=None):
    out = tmp_path / "prepared"
    info = ingest.run(reader, str(src), options or {}, 0.2, 0.2, 0, str(out), on_invalid, 2, 512)
    return info, out, lambda: validate.run(str(out), 2, 512, str(tmp_path / "report.json"))


def test_a_blank_title_is_not_dropped_silently_and_the_error_names_the_source_line(tmp_path):
    src = _source(tmp_path, {7: {"title": "   ", "description": None}})
    _, _, run_validate = _ingest_and_validate(tmp_path, src)
    with pytest.raises(DataError, match=rf"^{src / 'items.jsonl'}:7: breaks rule 'texts non-empty'"):
        run_validate()


def test_validation_errors_name_the_users_file_and_line_not_the_prepared_copy(tmp_path):
    src = _source(tmp_path, {12: {"title": "A", "description": None}})
    _, out, run_validate = _ingest_and_validate(tmp_path, src)
    with pytest.raises(DataError) as e:
        run_validate()
    assert str(e.value).startswith(f"{src / 'items.jsonl'}:12: breaks rule 'text length >= 2'")
    assert str(out) not in str(e.value)


def test_a_duplicated_id_names_both_lines(tmp_path):
    first = json.loads((DEFAULT_DATA / "items.jsonl").read_text().splitlines()[3])["id"]
    src = _source(tmp_path, {9: {"id": first}})
    with pytest.raises(DataError, match=rf"items.jsonl:9: breaks rule 'ids unique': item id '{first}' occurs twice "
                                        r"\(lines 4 and 9\)"):
        prepare_dataset("openclipart", src, {}, 0.2, 0.2, 0)


def test_drop_removes_and_lists_bad_texts_and_items_and_validation_then_passes(tmp_path, capsys):
    long = "word " * 130
    src = _source(tmp_path, {7: {"title": "   ", "description": None},
                             12: {"title": "A", "description": "a small red apple on a table"},
                             20: {"description": long}})
    missing = json.loads((src / "items.jsonl").read_text().splitlines()[24])["image"]
    (src / missing).unlink()
    info, out, run_validate = _ingest_and_validate(tmp_path, src, on_invalid="drop")
    dropped = json.loads((out / "dropped.json").read_text())
    where = str(src / "items.jsonl")
    assert [(d["where"], d["dropped"], d["rule"]) for d in dropped] == [
        (f"{where}:7", "item", "texts non-empty"),
        (f"{where}:12", "text", "text length >= 2"),
        (f"{where}:20", "text", "text length <= 512"),
        (f"{where}:25", "item", "image file exists"),
    ]
    assert info["dropped"] == {"items": 2, "texts": 2} and sum(info["counts"].values()) == 28
    assert "removed 2 item(s) and 2 text(s)" in capsys.readouterr().err
    kept = {it.id: it for it in load_prepared(out).items}
    row12 = json.loads((src / "items.jsonl").read_text().splitlines()[11])
    assert kept[row12["id"]].texts == ("a small red apple on a table",)  # the item stays with its good text
    assert run_validate()["success"]


def _edit_json(path: Path, edit) -> Path:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# JSON and .npz sources have no lines: an item's origin is its place in the file (images[2], test_*[7])

def test_a_bad_coco_caption_names_the_caption_file_image_entry_and_annotations(shared_datasets, tmp_path):
    src = _make_coco(shared_datasets, tmp_path / "coco")
    path = _edit_json(src / "annotations" / "captions_train2017.json",
                      lambda d: d["annotations"][2].update(caption="word " * 130))  # a caption of images[2]
    info, out, _ = _ingest_and_validate(tmp_path, src, on_invalid="drop", reader="coco")
    dropped = [d for d in json.loads((out / "dropped.json").read_text()) if d["rule"] == "text length <= 512"]
    # images[2] has annotations 3 (id 4) and 2 (id 5), in annotation-id order
    assert [d["where"] for d in dropped] == [f"{path}:images[2] (annotations[3, 2])"]


def test_a_bad_karpathy_sentence_names_the_json_file_and_image_entry(shared_datasets, tmp_path):
    src = _make_karpathy(shared_datasets, tmp_path / "karpathy")
    path = _edit_json(src / "dataset_coco.json", lambda d: d["images"][3]["sentences"][0].update(raw="A"))
    _, out, run_validate = _ingest_and_validate(tmp_path, src, reader="karpathy", options={"image_root": "imgs"})
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:images\[3\]: breaks rule 'text length >= 2'"):
        run_validate()


def test_a_duplicated_karpathy_id_names_both_image_entries(shared_datasets, tmp_path):
    src = _make_karpathy(shared_datasets, tmp_path / "karpathy")
    _edit_json(src / "dataset_coco.json", lambda d: d["images"][4].update(imgid=1))
    with pytest.raises(DataError, match=r"dataset_coco\.json:images\[4\]: breaks rule 'ids unique': item id '1' "
                                        r"occurs twice \(images\[1\] and images\[4\]\)"):
        prepare_dataset("karpathy", src, {}, 0.2, 0.2, 0)


def test_a_bad_feature_row_names_the_npz_arrays_and_row(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"{split}_{m}": rng.standard_normal((n, d)).astype(np.float32)
              for split, n in (("train", 40), ("test", 12)) for m, d in (("image", 6), ("text", 4))}
    arrays |= {"train_label": rng.integers(0, 3, 40), "test_label": rng.integers(0, 3, 12)}
    arrays["test_image"][7, 3] = np.nan
    np.savez(tmp_path / "w.npz", **arrays)
    _, _, run_validate = _ingest_and_validate(tmp_path, tmp_path / "w.npz", reader="features_npz")
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'w.npz'))}:test_\*\[7\]: "
                                        r"breaks rule 'features finite'"):
        run_validate()


def test_features_mat_rows_name_their_line_of_the_split_list(shared_datasets):
    from cmr.data.readers import READERS

    folder = shared_datasets / "wikipedia_cmr" / "original"
    result = READERS.get("features_mat")(folder / "raw_features.mat")
    by_id = {it.id: it for it in result.items}
    for item_id, list_name in (("train/0000", "trainset_txt_img_cat.list"), ("test/0007", "testset_txt_img_cat.list")):
        where = result.origins[item_id]
        path, _, line = where.rpartition(":")
        assert path == str(folder / list_name)
        text_id = (folder / list_name).read_text().splitlines()[int(line) - 1].split("\t")[0]
        assert text_id == by_id[item_id].meta["text_id"]


def test_fail_is_the_default_and_keeps_every_row(tmp_path):
    src = _source(tmp_path, {12: {"title": "A"}})
    prepared = prepare_dataset("openclipart", src, {}, 0.2, 0.2, 0)
    assert len(prepared.items) == 30 and prepared.dropped is None


@pytest.mark.slow
def test_the_full_openclipart_passes_validation_with_drop(shared_datasets, tmp_path):
    info = ingest.run("openclipart", str(shared_datasets / "openclipart"), {}, 0.1, 0.15, 0,
                      str(tmp_path / "prepared"), "drop", 2, 512)
    assert info["dropped"]["texts"] + info["dropped"]["items"] > 0
    assert validate.run(str(tmp_path / "prepared"), 2, 512, str(tmp_path / "report.json"))["success"]
