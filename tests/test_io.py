"""Reading the pipeline's own artefacts: a missing, corrupt or incomplete file is a DataError naming it."""
import numpy as np
import pytest

from cmr.embeddings import load_split
from cmr.errors import DataError
from cmr.io import read_json, read_npz


def test_read_json_names_the_file_and_the_rule(tmp_path):
    path = tmp_path / "x.json"
    with pytest.raises(DataError, match=rf"{path}: breaks rule 'file exists'"):
        read_json(path)
    path.write_text('{"a": 1,\n "b": }')
    with pytest.raises(DataError, match=rf"{path}:2: breaks rule 'valid JSON'"):
        read_json(path)
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(DataError, match=rf"{path}: breaks rule 'UTF-8 JSON'"):
        read_json(path)
    path.write_text("[1, 2]")
    assert read_json(path) == [1, 2]
    with pytest.raises(DataError, match=rf"{path}: breaks rule 'a JSON object': got list"):
        read_json(path, dict)
    with pytest.raises(DataError, match=rf"{tmp_path}: breaks rule 'a JSON file': is a folder"):
        read_json(tmp_path)


def test_read_npz_names_the_file_and_the_rule(tmp_path):
    path = tmp_path / "x.npz"
    with pytest.raises(DataError, match=rf"{path}: breaks rule 'file exists'"):
        read_npz(path, ("a",))
    np.savez(path, a=np.arange(3), b=np.ones(2))
    assert sorted(read_npz(path)) == ["a", "b"] and read_npz(path, ("a",))["a"].tolist() == [0, 1, 2]
    with pytest.raises(DataError, match=rf"{path}: breaks rule 'holds arrays a, c': missing c"):
        read_npz(path, ("a", "c"))
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(DataError, match=rf"{path}: breaks rule 'a readable .npz of plain arrays'"):
        read_npz(path, ("a",))
    path.write_text("not an archive")
    with pytest.raises(DataError, match=rf"{path}: breaks rule 'a readable .npz of plain arrays'"):
        read_npz(path)
    np.savez(path, a=np.array([{"pickled": 1}], dtype=object))
    with pytest.raises(DataError, match=rf"{path}: breaks rule 'a readable .npz of plain arrays'.*pickle"):
        read_npz(path, ("a",))


def test_embeddings_that_break_their_layout_are_rejected(tmp_path):
    path = tmp_path / "test.npz"
    fields = dict(image=np.zeros((2, 4), np.float32), text=np.zeros((3, 4), np.float32), text_item=np.array([0, 1, 2]),
                  ids=np.array(["a", "b"]), texts=np.array(["x", "y", "z"]), labels=np.zeros((2, 0), np.float32),
                  identity=np.full(2, -1))
    np.savez(path, **fields)
    with pytest.raises(DataError, match=rf"{path}: text_item: breaks rule 'image rows in \[0, 2\)': got 0..2"):
        load_split(path)
    np.savez(path, **(fields | {"text_item": np.array([0, 1, 1])}))
    assert load_split(path).text_item.tolist() == [0, 1, 1]
    text = fields["text"].copy()
    text[2, 1] = np.nan
    np.savez(path, **(fields | {"text_item": np.array([0, 1, 1]), "text": text}))
    with pytest.raises(DataError, match=rf"{path}: text\[2\]: breaks rule 'all embedding values finite'"):
        load_split(path)
    np.savez(path, **{k: v for k, v in fields.items() if k != "texts"})
    with pytest.raises(DataError, match="missing texts"):
        load_split(path)
