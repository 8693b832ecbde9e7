"""FAISS indexes: exact search vs torch, approximate recall on clustered data, save/load checks."""
import json

import numpy as np
import pytest
import torch

from cmr.errors import ConfigError, DataError
from cmr.retrieval.index import INDEXES, build_index, load_index, recall_vs_exact


def clustered(n, dim=64, n_clusters=50, seed=0, spread=1.5):
    """L2-normalised Gaussian blobs around random centres, like embeddings of a few topics."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim))
    x = centres[rng.integers(0, n_clusters, n)] + spread * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    both = clustered(5200, seed=1)
    return both[:5000], both[5000:], [f"item{i}" for i in range(5000)]


def test_flat_equals_torch_matmul_topk(data):
    gallery, queries, ids = data
    scores, rows = build_index("flat", gallery, ids, device="cpu").search(queries, 10)
    want = torch.from_numpy(queries) @ torch.from_numpy(gallery).T
    top = want.topk(10, dim=1)
    np.testing.assert_allclose(scores, top.values.numpy(), rtol=1e-5, atol=1e-5)
    # Rows agree except where two scores tie to float precision.
    same = rows == top.indices.numpy()
    gap = np.abs(want.numpy()[np.arange(len(rows))[:, None], rows] - top.values.numpy())
    assert (same | (gap < 1e-5)).all()


@pytest.mark.parametrize("kind,cheap,default", [("ivf", {"nprobe": 1}, {"nprobe": 16}),
                                                 ("hnsw", {"ef_search": 10}, {"ef_search": 64})])
def test_approximate_recall_vs_flat(data, kind, cheap, default):
    # Blobs overlap (noise 1.5x the centre scale), so neighbours cross cluster borders:
    # on this data nprobe 1 / ef_search 10 lose 15-40 % of the true top 10.
    gallery, queries, ids = data
    exact = build_index("flat", gallery, ids, device="cpu")
    approx = build_index(kind, gallery, ids, device="cpu", M=16) if kind == "hnsw" else \
        build_index(kind, gallery, ids, device="cpu")
    low = recall_vs_exact(approx.tune(**cheap), exact, queries, 10)
    high = recall_vs_exact(approx.tune(**default), exact, queries, 10)
    print(f"{kind}: recall@10 vs flat {low:.3f} at {cheap}, {high:.3f} at {default}")
    assert low < 0.9 and 0.95 <= high <= 1.0
    if kind == "ivf":  # probing every list is exhaustive
        assert recall_vs_exact(approx.tune(nprobe=approx.faiss_index.nlist), exact, queries, 10) > 0.999


@pytest.mark.parametrize("storage,score_tol", [("sq8", 0.02), ("fp16", 1e-3)])
def test_hnsw_on_scalar_quantised_storage_keeps_recall_and_scores(data, tmp_path, storage, score_tol):
    gallery, queries, ids = data
    exact = build_index("flat", gallery, ids, device="cpu")
    approx = build_index("hnsw", gallery, ids, device="cpu", M=16, storage=storage, ef_search=64)
    assert type(approx.faiss_index).__name__ == "IndexHNSWSQ"
    assert 0.95 <= recall_vs_exact(approx, exact, queries, 10) <= 1.0
    # Scores are inner products of the decoded vectors: close to, not equal to, the exact ones.
    scores, rows = approx.search(queries, 10)
    true = np.einsum("qd,qkd->qk", queries, gallery[rows])
    assert 0 < np.abs(scores - true).max() < score_tol
    approx.save(tmp_path / "idx")
    loaded = load_index(tmp_path / "idx", device="cpu")
    assert loaded.build_options["storage"] == storage
    np.testing.assert_array_equal(loaded.search(queries, 5)[1], approx.search(queries, 5)[1])
    with pytest.raises(ConfigError, match="storage"):
        build_index("hnsw", gallery[:100], ids[:100], device="cpu", storage="pq")


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_adding_in_chunks_gives_the_index_of_one_add(data, kind, monkeypatch):
    from cmr.retrieval import index as index_module

    gallery, queries, ids = data
    whole = build_index(kind, gallery, ids, device="cpu", recall_sample=0)
    monkeypatch.setattr(index_module, "ADD_CHUNK", 700)  # 5,000 rows: 7 full chunks and a part
    chunked = build_index(kind, gallery, ids, device="cpu", recall_sample=0)
    assert chunked.count == whole.count == len(gallery)
    for a, b in zip(whole.search(queries, 10), chunked.search(queries, 10)):
        np.testing.assert_array_equal(a, b)


def test_hnsw_added_in_chunks_keeps_its_recall(data, monkeypatch):
    from cmr.retrieval import index as index_module

    gallery, queries, ids = data
    exact = build_index("flat", gallery, ids, device="cpu")
    monkeypatch.setattr(index_module, "ADD_CHUNK", 700)
    chunked = build_index("hnsw", gallery, ids, device="cpu", M=16, recall_sample=0)
    assert 0.95 <= recall_vs_exact(chunked, exact, queries, 10) <= 1.0


def test_search_ids(data):
    gallery, _, ids = data
    index = build_index("flat", gallery[:100], ids[:100], device="cpu")
    scores, found = index.search_ids(torch.from_numpy(gallery[[3, 7]]), 2)
    assert [row[0] for row in found] == ["item3", "item7"]
    assert scores.shape == (2, 2) and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("kind", INDEXES.names())
def test_save_load_round_trip(data, tmp_path, kind):
    gallery, queries, ids = data
    options = {"ivf": {"nlist": 20, "nprobe": 3}, "hnsw": {"M": 8, "ef_search": 20}}.get(kind, {})
    index = build_index(kind, gallery[:1000], ids[:1000], device="cpu", **options)
    index.save(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["idx"]  # no temp leftovers
    loaded = load_index(tmp_path / "idx", expect_dim=64, expect_count=1000, device="cpu")
    assert loaded.ids == ids[:1000] and loaded.kind == kind and loaded.search_options == index.search_options
    for a, b in zip(index.search(queries, 5), loaded.search(queries, 5)):
        np.testing.assert_array_equal(a, b)


def saved(tmp_path, n=200):
    path = tmp_path / "idx"
    build_index("flat", clustered(n), [str(i) for i in range(n)], device="cpu").save(path)
    return path


def test_load_expectations_mismatch(tmp_path):
    path = saved(tmp_path)
    with pytest.raises(DataError, match=r"meta\.json.*expected dim 32, index has 64"):
        load_index(path, expect_dim=32)
    with pytest.raises(DataError, match="expected 10 items, index has 200"):
        load_index(path, expect_count=10)


@pytest.mark.parametrize("field,value,message", [
    ("dim", 65, r"index\.faiss.*index dim 64 != meta dim 65"),
    ("count", 201, "index holds 200 vectors, meta count 201"),
    ("metric", "l2", "metric is 'inner_product', got 'l2'"),
    ("kind", "annoy", "kind"),
])
def test_load_meta_mismatch(tmp_path, field, value, message):
    path = saved(tmp_path)
    meta = json.loads((path / "meta.json").read_text())
    meta[field] = value
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=message):
        load_index(path)


def test_load_id_map_mismatch_and_missing_file(tmp_path):
    path = saved(tmp_path)
    (path / "ids.json").write_text(json.dumps([str(i) for i in range(199)]))
    with pytest.raises(DataError, match=r"ids\.json.*199 ids for 200 index vectors"):
        load_index(path)
    (path / "index.faiss").unlink()
    with pytest.raises(DataError, match=r"index\.faiss.*file missing"):
        load_index(path)


@pytest.mark.parametrize("saved_kind,meta_kind", [("hnsw", "flat"), ("flat", "ivf"), ("ivf", "hnsw")])
def test_load_rejects_a_meta_kind_that_is_not_the_files_index(tmp_path, saved_kind, meta_kind):
    """meta.json's kind must name the FAISS index in the file: an approximate index must never load as
    'flat' (exact), and a kind's search options must never be set on another kind's index."""
    x = clustered(200)
    path = build_index(saved_kind, x, [str(i) for i in range(200)]).save(tmp_path / "ix")
    meta = json.loads((path / "meta.json").read_text())
    meta.update(kind=meta_kind, search_options={})
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=rf"index\.faiss.*kind matches.*meta kind '{meta_kind}' needs"):
        load_index(path)


def test_load_rejects_duplicate_ids(tmp_path):
    path = saved(tmp_path)
    ids = json.loads((path / "ids.json").read_text())
    ids[7] = ids[2]
    (path / "ids.json").write_text(json.dumps(ids))
    with pytest.raises(DataError, match=r"ids\.json\[7\].*ids are unique.*is also row 2"):
        load_index(path)


def test_build_rejects_bad_input():
    x = clustered(50)
    with pytest.raises(DataError, match="49 ids for 50 rows"):
        build_index("flat", x, [str(i) for i in range(49)])
    with pytest.raises(DataError, match=r"ids\[3\].*'0' is also row 0"):
        build_index("flat", x, ["0", "1", "2", "0"] + [str(i) for i in range(4, 50)])
    with pytest.raises(ConfigError, match="unknown option 'nprob'.*nprobe"):
        build_index("ivf", x, [str(i) for i in range(50)], nprob=4)
    with pytest.raises(ConfigError, match="nlist 100 is more than the 50"):
        build_index("ivf", x, [str(i) for i in range(50)], nlist=100)
    with pytest.raises(DataError, match="queries"):
        build_index("flat", x, [str(i) for i in range(50)]).search(np.zeros((2, 3)), 1)
    for nlist in (0, -1, 2.5):  # 0 used to mean 'choose for me' silently
        with pytest.raises(ConfigError, match=f"nlist must be a whole number >= 1.*got {nlist}"):
            build_index("ivf", x, [str(i) for i in range(50)], nlist=nlist)
    for kind, option in (("hnsw", {"M": -1}), ("hnsw", {"M": 1}), ("hnsw", {"ef_search": 0}),
                         ("hnsw", {"ef_construction": 2.5}), ("ivf", {"nprobe": 0})):
        (key, value), = option.items()  # unchecked, M -1 made FAISS ask for memory until it was killed
        with pytest.raises(ConfigError, match=f"{key} must be a whole number >= {2 if key == 'M' else 1}, got {value}"):
            build_index(kind, x, [str(i) for i in range(50)], **option)
    with pytest.raises(ConfigError, match="nprobe must be a whole number >= 1, got -2"):
        build_index("ivf", x, [str(i) for i in range(50)], nlist=2).tune(nprobe=-2)
    with pytest.raises(DataError, match=r"embeddings.*at least one row"):
        build_index("flat", x[:0], [])
    index = build_index("flat", x, [str(i) for i in range(50)])
    for k in (0, -3, 1.5):
        with pytest.raises(ConfigError, match=f"k must be a whole number >= 1, got {k}"):
            index.search(x[:2], k)
    assert index.search(x[:2], np.int64(60))[1].shape == (2, 50)  # k above the count: every item


def test_index_benchmark_runs_small(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "bench_index.py"
    spec = importlib.util.spec_from_file_location("bench_index", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--n", "2000", "--dim", "32", "--queries", "50", "--clusters", "20", "--repeats", "1",
                "--nprobe", "1", "51", "--ef-search", "16", "--hnsw-m", "8"])
    out = capsys.readouterr().out
    assert "ratio to best torch" in out and "fastest at recall >= 0.95: nprobe=51" in out
