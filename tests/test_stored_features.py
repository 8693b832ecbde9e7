"""Feature arrays of a prepared dataset read from disk per indexing call (cmr.data.stored_features):
the same values as the arrays written, whole or in any rows, and a features dataset encoded in
shards gives the embeddings encoding it whole gives."""
from __future__ import annotations

import pickle
import types
import zipfile

import numpy as np
import pytest
import torch

from cmr.data.prepare import load_prepared, prepare_dataset, save_prepared
from cmr.data.stored_features import StoredArray, open_npz_member
from cmr.embeddings import load_split, shards_dir
from cmr.models.feature_heads import FeatureHeads
from cmr.training.encoding import encode_split_sharded, encode_split_whole


def features_source(folder, n_train: int = 23, n_test: int = 7, seed: int = 0):
    """A features_npz source (synthetic vectors): image [N, 12] float32, text [N, 5] float64."""
    rng = np.random.default_rng(seed)
    arrays = {"categories": np.array(["a", "b", "c"])}
    for split, n in (("train", n_train), ("test", n_test)):
        arrays[f"{split}_image"] = rng.normal(size=(n, 12)).astype(np.float32)
        arrays[f"{split}_text"] = rng.normal(size=(n, 5))
        arrays[f"{split}_label"] = rng.integers(0, 3, size=n)
    folder.mkdir()
    np.savez(folder / "synthetic.npz", **arrays)
    return folder


@pytest.fixture
def prepared(tmp_path):
    p = prepare_dataset("features_npz", features_source(tmp_path / "src"), {}, 0.2, 0.0, 0)
    return p, load_prepared(save_prepared(p, tmp_path / "prepared"))


def test_loaded_features_are_stored_arrays_equal_to_the_written_ones(prepared):
    written, loaded = prepared
    for m in ("image", "text"):
        a, b = written.features[m], loaded.features[m]
        assert isinstance(b, StoredArray) and b.shape == a.shape and b.dtype == a.dtype and len(b) == len(a)
        np.testing.assert_array_equal(np.asarray(b), a)
        rows = [29, 3, 3, 0, 17]  # any order, repeats: what a split's feature_row list can be
        for key in (rows, np.array(rows), slice(4, 19, 3), 11, (5, 2), ..., np.arange(len(a)) % 2 == 1):
            got = b[key]
            np.testing.assert_array_equal(got, a[key])
            assert not isinstance(got, np.memmap)


def test_a_stored_array_is_a_copy_pickles_and_survives_its_file_being_replaced(tmp_path):
    a = np.arange(24, dtype=np.int64).reshape(6, 4)
    np.savez(tmp_path / "f.npz", x=a, y=np.asfortranarray(a.astype(np.float64)))
    x, y = open_npz_member(tmp_path / "f.npz", "x"), open_npz_member(tmp_path / "f.npz", "y")
    np.testing.assert_array_equal(y[1:3], a[1:3])  # Fortran order read as such
    part = x[2:4]
    part[:] = -1  # writing the copy leaves the file alone
    np.testing.assert_array_equal(x[2:4], a[2:4])
    np.testing.assert_array_equal(np.asarray(pickle.loads(pickle.dumps(x))), a)
    # an atomic replace of the folder's file (rename over it) does not change what x reads
    np.savez(tmp_path / "g.npz", x=a + 100, y=a)
    (tmp_path / "g.npz").replace(tmp_path / "f.npz")
    np.testing.assert_array_equal(x[[0, 5]], a[[0, 5]])
    with pytest.raises(KeyError):
        open_npz_member(tmp_path / "f.npz", "z")


def test_compressed_or_empty_members_are_read_whole(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.savez_compressed(tmp_path / "c.npz", x=a, e=np.zeros((0, 4), np.float32))
    with zipfile.ZipFile(tmp_path / "c.npz") as z:
        assert z.getinfo("x.npy").compress_type == zipfile.ZIP_DEFLATED
    got, empty = open_npz_member(tmp_path / "c.npz", "x"), open_npz_member(tmp_path / "c.npz", "e")
    assert type(got) is np.ndarray and type(empty) is np.ndarray and empty.shape == (0, 4)
    np.testing.assert_array_equal(got, a)


@pytest.mark.parametrize("shard_size", [1, 4, 100])
def test_sharded_encode_of_stored_features_equals_whole_encode(prepared, tmp_path, shard_size, monkeypatch):
    _, loaded = prepared
    rows_read = []  # rows each indexing call returned
    read = StoredArray.__getitem__
    monkeypatch.setattr(StoredArray, "__getitem__", lambda self, key: rows_read.append(len(out := read(self, key)))
                        or out)
    torch.manual_seed(0)
    heads = FeatureHeads(12, 5, 8, head="linear")
    bundle = types.SimpleNamespace(model=heads, tokenizer=None, preprocess_val=None)
    whole_path = tmp_path / "whole" / "train.npz"
    whole_path.parent.mkdir()
    encode_split_whole(bundle, loaded, "train", "synthetic", "cpu", whole_path)
    sharded = shards_dir(tmp_path / "sharded" / "train.npz")
    sharded.parent.mkdir()
    rows_read.clear()

    def whole_read(self, dtype=None, copy=None):
        raise AssertionError("the sharded path read a feature array whole")

    monkeypatch.setattr(StoredArray, "__array__", whole_read)
    manifest = encode_split_sharded(bundle, loaded, "train", "synthetic", "cpu", sharded, shard_size)
    assert rows_read and max(rows_read) <= shard_size  # one shard's rows at a time
    whole, parts = load_split(whole_path), load_split(tmp_path / "sharded" / "train.npz")
    n = len(whole.ids)
    assert manifest["items"] == n and len(manifest["shards"]) == -(-n // shard_size)
    assert parts.ids == whole.ids and parts.texts == whole.texts
    torch.testing.assert_close(parts.image, whole.image, rtol=0, atol=1e-6)
    torch.testing.assert_close(parts.text, whole.text, rtol=0, atol=1e-6)
    assert torch.equal(parts.labels, whole.labels) and torch.equal(parts.text_item, whole.text_item)
    # against the arrays as written, through the heads directly
    rows = [it.feature_row for it in loaded.items if it.split == "train"]
    expect = heads.head_image(torch.as_tensor(prepared[0].features["image"][rows]))
    torch.testing.assert_close(whole.image, expect.detach(), rtol=0, atol=1e-6)
