"""Encoding in shards (``encode.shard_size``): same embeddings as encoding whole, a crash leaves no
half-written output, and the index stage builds the same index from shards as from whole splits."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cmr.check import check_settings
from cmr.config import load_params
from cmr.data.prepare import prepare_dataset, save_prepared
from cmr.embeddings import (MANIFEST, SplitEmbeddings, iter_gallery, load_gallery, load_split, read_manifest,
                            save_split, shards_dir, write_shards)
from cmr.errors import ConfigError, DataError
from cmr.models import save_two_tower
from cmr.retrieval.index import build_index, load_index
from cmr.retrieval.stream_index import build_index_streamed
from cmr.stages import encode, index as index_stage
from cmr.stages._methods import require_shardable
from cmr.training import encoding

SHARD = 4


@pytest.fixture(scope="module")
def prepared_dir(repo_root, tmp_path_factory) -> Path:
    """30 real openclipart items (train 18, val 6, test 6), each with its title and keywords as texts
    (1-4 texts an item) and its category as an identity, so text_item and identity numbering are tested."""
    folder = tmp_path_factory.mktemp("tiny")
    source = repo_root / "data" / "raw" / "openclipart_mini"
    (folder / "src").mkdir()
    lines = (source / "items.jsonl").read_text(encoding="utf-8").splitlines()
    (folder / "src" / "items.jsonl").write_text("\n".join(lines[::75][:30]) + "\n", encoding="utf-8")
    (folder / "src" / "images").symlink_to(source / "images")
    p = prepare_dataset("openclipart", folder / "src", {}, 0.2, 0.2, 0)
    items = [dataclasses.replace(it, texts=tuple(dict.fromkeys(it.texts + tuple(it.meta["keywords"][:3]))),
                                 identity=it.labels[0]) for it in p.items]
    assert len({len(it.texts) for it in items}) > 1
    return save_prepared(dataclasses.replace(p, items=items), folder / "prepared")


@pytest.fixture(scope="module")
def model_dir(lite0, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    save_two_tower(lite0.model, lite0.spec, folder / "model")
    (folder / "training.json").write_text(json.dumps({"backbone_id": "lite0-minilm|offline"}))
    return folder


@pytest.fixture(scope="module")
def encoded(prepared_dir, model_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("emb")
    counts = {n: encode.run(str(prepared_dir), str(model_dir), str(out / f"s{n}"), "cpu", None, shard_size=n)
              for n in (0, SHARD)}
    return {"whole": out / "s0", "sharded": out / f"s{SHARD}", "counts": counts}


def _same(a: SplitEmbeddings, b: SplitEmbeddings, atol: float = 1e-5) -> None:
    assert a.ids == b.ids and a.texts == b.texts
    assert torch.equal(a.text_item, b.text_item)
    torch.testing.assert_close(a.image, b.image, atol=atol, rtol=0)
    torch.testing.assert_close(a.text, b.text, atol=atol, rtol=0)
    for name in ("labels", "identity"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name


def test_sharded_encode_equals_whole_encode(encoded):
    whole, sharded = encoded["whole"], encoded["sharded"]
    assert sorted(p.name for p in whole.iterdir()) == ["test.npz", "train.npz", "val.npz"]
    assert sorted(p.name for p in sharded.iterdir()) == ["test.shards", "train.shards", "val.shards"]
    for split in ("train", "val", "test"):
        a, b = load_split(whole / f"{split}.npz"), load_split(sharded / f"{split}.npz")
        _same(a, b)
        assert a.identity is not None and a.labels is not None  # numbered over the split, not per shard
    _same(load_gallery(str(whole)), load_gallery(str(sharded)))


def test_shard_count_and_sizes(encoded):
    m = read_manifest(encoded["sharded"] / "train.shards")
    assert [s["items"] for s in m["shards"]] == [4, 4, 4, 4, 2] and m["items"] == 18 and m["shard_size"] == SHARD
    whole = load_split(encoded["whole"] / "train.npz")
    assert [s["texts"] for s in m["shards"]] == [int(sum(whole.text_item // SHARD == i)) for i in range(5)]
    assert m["texts"] == len(whole.texts) and m["dim"] == whole.image.shape[1]
    assert encoded["counts"][SHARD]["train"] == {"items": 18, "texts": len(whole.texts), "shards": 5}
    assert encoding.shard_bounds(18, 4) == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 18)]
    assert encoding.shard_bounds(8, 4) == [(0, 4), (4, 8)] and encoding.shard_bounds(0, 4) == []


def test_a_crash_mid_stream_leaves_the_old_output_and_no_temporary_folder(encoded, prepared_dir, model_dir,
                                                                        tmp_path, monkeypatch):
    out = tmp_path / "emb"
    out.mkdir()
    (out / "marker").write_text("old")
    calls = []
    real = encoding.encode_shard

    def dies_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed mid-stream")
        return real(*args, **kwargs)

    monkeypatch.setattr(encoding, "encode_shard", dies_on_third)
    with pytest.raises(RuntimeError, match="killed mid-stream"):
        encode.run(str(prepared_dir), str(model_dir), str(out), "cpu", None, shard_size=SHARD)
    assert len(calls) == 3
    assert sorted(p.name for p in out.iterdir()) == ["marker"]  # the old folder, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb"]  # no .emb.pid*.tmp left


def test_write_shards_is_all_or_nothing_and_checks_its_manifest(tmp_path):
    def parts(fail_at=None):
        for i in range(3):
            if i == fail_at:
                raise OSError("disk full")
            yield SplitEmbeddings(torch.full((2, 3), float(i)), torch.ones(1, 3), torch.zeros(1, dtype=torch.long),
                                  [f"a{i}", f"b{i}"], [f"t{i}"], None, None)

    with pytest.raises(OSError):
        write_shards(tmp_path / "x.shards", parts(fail_at=2), 2)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="at least one shard"):
        write_shards(tmp_path / "x.shards", iter([]), 2)
    m = write_shards(tmp_path / "x.shards", parts(), 2)
    assert (m["items"], m["texts"], len(m["shards"])) == (6, 3, 3)
    e = load_split(tmp_path / "x.npz")
    assert e.ids == ["a0", "b0", "a1", "b1", "a2", "b2"] and e.text_item.tolist() == [0, 2, 4]
    good = (tmp_path / "x.shards" / MANIFEST).read_text()
    bad = json.loads(good)
    bad["shards"][1]["items"] = 3
    bad["items"] = 7
    (tmp_path / "x.shards" / MANIFEST).write_text(json.dumps(bad))
    with pytest.raises(DataError, match="00001.npz"):
        load_split(tmp_path / "x.npz")
    (tmp_path / "x.shards" / MANIFEST).write_text(good)
    (tmp_path / "x.shards" / "00002.npz").unlink()
    with pytest.raises(DataError, match="00002.npz"):
        load_split(tmp_path / "x.npz")


def _reshard(whole: Path, out: Path, size: int) -> None:
    """The whole-split files of ``whole`` cut into shards of ``size`` items, embeddings bit for bit."""
    out.mkdir()
    for split in ("train", "val", "test"):
        e = load_split(whole / f"{split}.npz")
        def pieces():
            for start in range(0, len(e.ids), size):
                rows = slice(start, start + size)
                keep = (e.text_item >= start) & (e.text_item < start + size)
                yield SplitEmbeddings(e.image[rows], e.text[keep], e.text_item[keep] - start, e.ids[rows],
                                      [t for t, k in zip(e.texts, keep) if k],
                                      None if e.labels is None else e.labels[rows],
                                      None if e.identity is None else e.identity[rows])
        write_shards(shards_dir(out / f"{split}.npz"), pieces(), size)


@pytest.mark.parametrize("calibrated", [False, True])
def test_index_from_shards_equals_index_from_whole_splits(encoded, tmp_path, calibrated):
    _reshard(encoded["whole"], tmp_path / "sharded", 5)
    gallery = load_gallery(str(encoded["whole"]))
    calibration = tmp_path / "cal"
    calibration.mkdir()
    if calibrated:  # a serving bias: one more column, sliced shard by shard
        rng = np.random.default_rng(0)
        with open(calibration / "serving_bias.npz", "wb") as f:
            np.savez(f, image=rng.normal(size=len(gallery.ids)).astype(np.float32),
                     text=rng.normal(size=len(gallery.texts)).astype(np.float32))
    infos = [index_stage.run(str(d), str(calibration), "flat", {}, "cpu", str(tmp_path / f"index-{d.name}"))
             for d in (encoded["whole"], tmp_path / "sharded")]
    assert infos[0] == infos[1]
    a, b = tmp_path / f"index-{encoded['whole'].name}", tmp_path / "index-sharded"
    assert (a / "gallery.json").read_bytes() == (b / "gallery.json").read_bytes()
    for name, queries in (("images", gallery.text), ("texts", gallery.image)):
        assert (a / name / "index.faiss").read_bytes() == (b / name / "index.faiss").read_bytes()
        assert (a / name / "ids.json").read_bytes() == (b / name / "ids.json").read_bytes()
        q = torch.cat([queries, torch.ones(len(queries), 1)], 1) if calibrated else queries
        ia, ib = load_index(a / name), load_index(b / name)
        sa, ra = ia.search(q, 10)
        sb, rb = ib.search(q, 10)
        np.testing.assert_array_equal(ra, rb)
        np.testing.assert_array_equal(sa, sb)


def _clustered(n, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(20, dim))[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_streamed_build_matches_build_index_and_a_naive_recall():
    x, q = _clustered(3000), _clustered(200, seed=1)
    ids = [f"r{i}" for i in range(len(x))]
    blocks = lambda size: (x[i:i + size] for i in range(0, len(x), size))
    flat = build_index_streamed("flat", blocks(700), ids, 32)
    np.testing.assert_array_equal(flat.search(q, 10)[1], build_index("flat", x, ids).search(q, 10)[1])
    # one block: the same training sample, so the same IVF index as build_index
    one = build_index_streamed("ivf", [x], ids, 32, recall_queries=q, nlist=16, nprobe=2)
    np.testing.assert_array_equal(one.search(q, 10)[1],
                                  build_index("ivf", x, ids, recall_queries=q, nlist=16, nprobe=2).search(q, 10)[1])
    # many blocks: trained on the first blocks; recall measured by merging per-block exact top 10
    options = dict(nlist=16, m=8, nbits=4, train_size=1000, nprobe=4)
    many = build_index_streamed("ivfpq", blocks(500), ids, 32, recall_queries=q, **options)
    exact = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]
    found = many.search(q, 10)[1]
    naive = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), exact.tolist())])
    assert many.build_stats["recall_at_10"] == pytest.approx(naive)
    assert many.build_stats["train_pool_rows"] == 1000 and many.count == 3000
    # trained on the first 1,000 rows rather than a sample of all 3,000: about as good
    whole = build_index("ivfpq", x, ids, recall_queries=q, recall_sample=200, **options)
    assert naive >= whole.build_stats["recall_at_10"] - 0.1
    with pytest.raises(DataError, match="3000 rows"):
        build_index_streamed("flat", [x[:2999]], ids, 32)


def test_shard_size_setting_is_typed_and_closed(repo_root):
    params = repo_root / "params.yaml"
    assert load_params(params).encode.shard_size == 0  # the default pipeline encodes whole splits
    assert load_params(params, {"encode.shard_size": 1000}).encode.shard_size == 1000
    with pytest.raises(ConfigError, match="shard_size"):
        load_params(params, {"encode.shard_size": -1})
    with pytest.raises(ConfigError, match="shard_size"):
        load_params(params, {"encode.shard_sise": 10})
    av = {"model.arch": "cmmixer-tiny", "data.gallery": "video", "data.query": "audio"}
    require_shardable(load_params(params, av))  # cmmixer encodes whole splits
    with pytest.raises(ConfigError, match=r"encode.shard_size: shards \(encode.shard_size 64\).*'cmmixer-tiny'"):
        check_settings(load_params(params, {**av, "encode.shard_size": 64}))


def test_iter_gallery_pieces_add_up_to_the_gallery(encoded):
    pieces = list(iter_gallery(encoded["sharded"]))
    assert len(pieces) == 5 + 2 + 2
    whole = load_gallery(str(encoded["whole"]))
    assert torch.equal(torch.cat([p.text_item for p in pieces]), whole.text_item)
    assert [i for p in pieces for i in p.ids] == whole.ids
