"""The generic ``table`` reader: a user's JSONL/CSV read by naming its fields, errors naming file:line:field."""
from __future__ import annotations

import json

import pytest

from cmr.data.prepare import prepare_dataset
from cmr.data.readers import READERS
from cmr.errors import ConfigError, DataError

from conftest import DEFAULT_DATA

read_table = READERS.get("table")


def test_a_jsonl_with_other_field_names_reads_as_the_dedicated_reader_would(tmp_path):
    rows = [json.loads(line) for line in (DEFAULT_DATA / "items.jsonl").read_text().splitlines()[:50]]
    rows[3]["description"] = "a longer description of the picture"
    table = tmp_path / "mine.jsonl"
    table.write_text("".join(json.dumps({"key": r["id"], "path": r["image"], "title": r["title"],
                                         "about": r["description"], "cat": [r["category"], *r["also_linked_as"]]})
                             + "\n" for r in rows))
    result = read_table(tmp_path, id="key", image="path", texts=["title", "about"], labels="cat",
                        media_root=str(DEFAULT_DATA))
    assert [it.id for it in result.items] == [r["id"] for r in rows]
    assert result.items[3].texts == (rows[3]["title"], "a longer description of the picture")
    assert result.items[0].texts == (rows[0]["title"],)  # a null description adds nothing
    assert result.items[0].labels == (rows[0]["category"],) and result.items[0].split == ""
    assert all((DEFAULT_DATA / it.image).is_file() for it in result.items)
    assert result.origins[rows[7]["id"]] == f"{table}:8"


def _csv(tmp_path, text: str):
    (tmp_path / "pairs.csv").write_text(text)
    return tmp_path / "pairs.csv"


def test_csv_cells_separators_split_names_and_quoted_newlines(tmp_path):
    path = _csv(tmp_path, 'photo,caption,tags,part\n'
                          '1,"a red apple|an apple, red",fruit|red,train\n'
                          '2,"a dog\non grass",animal,dev\n'
                          '3,a cat,,holdout\n')
    result = read_table(path, id="photo", image=None, texts=["caption"], labels="tags", split="part",
                        text_separator="|", label_separator="|", split_names={"holdout": "test"})
    assert [(it.id, it.texts, it.labels, it.split) for it in result.items] == [
        ("1", ("a red apple", "an apple, red"), ("fruit", "red"), "train"),
        ("2", ("a dog\non grass",), ("animal",), "val"),
        ("3", ("a cat",), (), "test"),
    ]
    assert result.origins["3"].endswith("pairs.csv:5")  # the quoted newline takes a line
    assert result.label_set == ["animal", "fruit", "red"]


@pytest.mark.parametrize("text, options, where, rule", [
    ("id,text\n1,a\n,b\n", {}, ":3", "field 'id' present"),
    ("id,text,split\n1,a,train\n2,b,later\n", {"split": "split"}, ":3", "field 'split' is one of train, val, test"),
    ("id,text\n1,a\n2,b\n1,c\n", {}, ":4", r"ids unique': item id '1' occurs twice \(lines 2 and 4\)"),
    ('{"id": 1, "text": {"a": 1}}\n', {}, ":1", "field 'text' is a string, a number or a list of them"),
])
def test_bad_rows_name_the_file_line_and_field(tmp_path, text, options, where, rule):
    path = (tmp_path / ("t.jsonl" if text.startswith("{") else "t.csv"))
    path.write_text(text)
    with pytest.raises(DataError, match=rf"^{path}{where}: breaks rule '{rule}"):
        read_table(path, image=None, **options)


def test_bad_options_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="split_names must map to train, val, test"):
        read_table(tmp_path, split_names={"x": "holdout"})
    with pytest.raises(ConfigError, match="option texts='caption' must be a list of strings or null"):
        read_table(tmp_path, texts="caption")
    with pytest.raises(DataError, match="a .jsonl/.csv/.tsv file, or a folder holding exactly one"):
        read_table(tmp_path)


def test_blank_texts_are_kept_for_validation_to_report(tmp_path):
    result = read_table(_csv(tmp_path, "id,text\n1,   \n2,ok\n"), image=None)
    assert [it.texts for it in result.items] == [("   ",), ("ok",)]


def test_flickr8k_reads_as_a_table_and_goes_through_prepare(shared_datasets):
    read = read_table(shared_datasets / "flickr8k", texts=["texts"], split="split")
    splits = [it.split for it in read.items]
    # the README's counts: train 6,000, dev (read as val) 1,000, test 1,000, none 91
    assert [splits.count(s) for s in ("train", "val", "test", "")] == [6000, 1000, 1000, 91]
    prepared = prepare_dataset("table", shared_datasets / "flickr8k", {"texts": ["texts"]}, 0.1, 0.15, 0)
    assert sum(prepared.info["counts"].values()) == 8091 and min(prepared.info["counts"].values()) > 0
    assert all(len(it.texts) == 5 for it in prepared.items[:100])
