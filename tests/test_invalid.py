"""Bad rows in a user's source: never dropped silently; errors name the source file and line;
``data.on_invalid: drop`` removes and lists them so the pipeline can go on."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cmr.data.prepare import load_prepared, prepare_dataset
from cmr.errors import DataError
from cmr.stages import ingest, validate

from conftest import DEFAULT_DATA


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


def _ingest_and_validate(tmp_path, src, on_invalid="fail"):
    out = tmp_path / "prepared"
    info = ingest.run("openclipart", str(src), {}, 0.2, 0.2, 0, str(out), on_invalid, 2, 512)
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
