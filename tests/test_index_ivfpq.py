"""IVF-PQ index: recall against exact search, scores of the decoded vectors, on-disk lists, build-time recall."""
import json
import shutil

import faiss
import numpy as np
import pytest
import torch

from cmr.errors import ConfigError, DataError
from cmr.retrieval.index import build_index, load_index
from cmr.retrieval.ivfpq import pq_m
from test_index import clustered


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    # PQ training runs many tiny k-means; on two busy cores OpenMP's waiting threads made it
    # 4-7x slower than one thread (m 16: 22 s vs 4 s at load 9).
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    both = clustered(6200, seed=3, spread=1.0)
    return both[:6000], both[6000:], [f"item{i}" for i in range(6000)]


def torch_topk_rows(gallery, queries, k):
    return (torch.from_numpy(queries) @ torch.from_numpy(gallery).T).topk(k, dim=1).indices.numpy()


def naive_recall(found, truth):
    return np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())])


def test_ivfpq_recall_against_torch_topk_and_build_time_recall(data):
    gallery, queries, ids = data
    index = build_index("ivfpq", gallery, ids, device="cpu", nlist=32, m=16, nprobe=8,
                        recall_queries=queries, recall_sample=len(queries))
    assert index.faiss_index.code_size == 16 and index.faiss_index.nlist == 32
    truth = torch_topk_rows(gallery, queries, 10)
    recall = naive_recall(index.search(queries, 10)[1], truth)
    print(f"ivfpq m=16 nprobe=8 recall@10 {recall:.3f}")
    # 4 bytes of codes per 16 floats: close to, not equal to, exact
    assert 0.6 < recall < 0.99
    # Every query was sampled, so the recall measured at build time is this one.
    assert index.build_stats["recall_at_10"] == pytest.approx(recall, abs=1e-9)
    assert index.build_stats["recall_queries"] == len(queries)
    assert index.build_stats["recall_query_source"] == "given queries"
    # More bytes per vector buys recall.
    finer = build_index("ivfpq", gallery, ids, device="cpu", nlist=32, m=32, nprobe=32, recall_sample=0)
    assert naive_recall(finer.search(queries, 10)[1], truth) > recall + 0.1
    assert finer.build_stats == {}


def test_ivfpq_scores_are_inner_products_with_the_decoded_vectors(data):
    gallery, queries, ids = data
    index = build_index("ivfpq", gallery, ids, device="cpu", nlist=16, m=8, recall_sample=0)
    scores, rows = index.search(queries[:20], 5)
    ivf = index.faiss_index
    ivf.make_direct_map()
    decoded = np.stack([ivf.reconstruct(int(r)) for r in rows.ravel()]).reshape(20, 5, -1)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries[:20], decoded), atol=1e-4)
    assert not np.allclose(decoded, gallery[rows], atol=1e-3)  # approximate, not the originals


def test_default_sub_quantisers_leave_eight_dimensions_each():
    assert (pq_m(512, None), pq_m(513, None), pq_m(64, None), pq_m(7, None)) == (64, 57, 8, 1)
    with pytest.raises(ConfigError, match="m must be .* divides the dimension 64, got 10"):
        pq_m(64, 10)


def test_gallery_rows_as_recall_queries_are_sampled_with_the_seed(data):
    gallery, _, ids = data
    a = build_index("ivfpq", gallery, ids, device="cpu", nlist=16, m=8, recall_sample=300, seed=1)
    b = build_index("ivfpq", gallery, ids, device="cpu", nlist=16, m=8, recall_sample=300, seed=1)
    assert a.build_stats == b.build_stats and a.build_stats["recall_query_source"] == "gallery rows"
    assert a.build_stats["recall_queries"] == 300 and 0 < a.build_stats["recall_at_10"] < 1
    # An HNSW index measures its recall too; the exact index does not.
    assert "recall_at_10" in build_index("hnsw", gallery[:1000], ids[:1000], M=8, recall_sample=50).build_stats
    assert build_index("flat", gallery[:1000], ids[:1000]).build_stats == {}


@pytest.mark.parametrize("on_disk", [False, True])
def test_save_load_moves_with_its_folder(data, tmp_path, on_disk):
    gallery, queries, ids = data
    index = build_index("ivfpq", gallery, ids, device="cpu", nlist=32, m=16, nprobe=4, on_disk=on_disk,
                        recall_sample=200)
    want = index.search(queries, 10)
    index.save(tmp_path / "a" / "idx")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["idx"]
    names = sorted(p.name for p in (tmp_path / "a" / "idx").iterdir())
    assert names == sorted(["ids.json", "index.faiss", "meta.json"] + (["lists.ivfdata"] if on_disk else []))
    # the folder written under a temp name and renamed, then moved: the lists are found beside the index
    shutil.move(tmp_path / "a" / "idx", tmp_path / "b")
    loaded = load_index(tmp_path / "b", expect_dim=64, expect_count=6000, device="cpu")
    lists = faiss.downcast_InvertedLists(loaded.faiss_index.invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists) == on_disk
    assert loaded.build_stats == index.build_stats and loaded.search_options == {"nprobe": 4}
    for a, b in zip(want, loaded.search(queries, 10)):
        np.testing.assert_array_equal(a, b)
    # the in-memory index kept its own lists after the save
    assert not isinstance(faiss.downcast_InvertedLists(index.faiss_index.invlists), faiss.OnDiskInvertedLists)
    np.testing.assert_array_equal(index.search(queries, 10)[1], want[1])
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta["build_stats"]["recall_at_10"] == index.build_stats["recall_at_10"]
    if on_disk:  # saved again from its on-disk lists
        loaded.save(tmp_path / "c")
        np.testing.assert_array_equal(load_index(tmp_path / "c").search(queries, 10)[1], want[1])
        (tmp_path / "b" / "lists.ivfdata").unlink()
        with pytest.raises(DataError, match=r"lists\.ivfdata.*inverted lists file.*missing"):
            load_index(tmp_path / "b")


@pytest.mark.parametrize("options,message", [
    ({"m": 10}, "divides the dimension 64, got 10"),
    ({"nbits": 0}, "nbits must be a whole number >= 1, got 0"),
    ({"nbits": 17}, "nbits must be between 1 and 16, got 17"),
    ({"train_size": 100}, "100 training rows are fewer than nlist 16 or the 2\\^nbits = 256"),
    ({"train_size": 0}, "train_size must be a whole number >= 1"),
    ({"on_disk": "yes"}, "on_disk must be true or false"),
    ({"nlist": 7000}, "nlist 7000 is more than the 6000 embeddings"),
])
def test_ivfpq_rejects_bad_options(data, options, message):
    gallery, _, ids = data
    with pytest.raises(ConfigError, match=message):
        build_index("ivfpq", gallery, ids, device="cpu", **{"nlist": 16, **options})


def test_recall_options_are_checked(data):
    gallery, _, ids = data
    with pytest.raises(ConfigError, match="recall_sample must be >= 0"):
        build_index("hnsw", gallery[:100], ids[:100], recall_sample=-1)
    with pytest.raises(DataError, match="recall_queries"):
        build_index("hnsw", gallery[:100], ids[:100], recall_queries=np.zeros((3, 5)))


def test_index_stage_builds_ivfpq_on_disk_with_bias_and_records_recall(tmp_path):
    """The index stage with kind ivfpq: a calibrated (bias-column, 65-d) on-disk index per modality whose
    build-time recall used the other modality as queries, and which loads and searches like flat."""
    from cmr.embeddings import SplitEmbeddings, save_split
    from cmr.stages.index import run

    both = clustered(3000, seed=5, spread=1.0)
    image, text = torch.from_numpy(both[:1500]), torch.from_numpy(both[1500:])
    ids = [f"i{n}" for n in range(1500)]
    save_split(tmp_path / "emb" / "test.npz", SplitEmbeddings(image, text, torch.arange(1500), ids,
                                                                [f"t{n}" for n in range(1500)], None, None))
    (tmp_path / "cal").mkdir()
    np.savez(tmp_path / "cal" / "serving_bias.npz", image=np.full(1500, -0.1, np.float32))
    info = run(str(tmp_path / "emb"), str(tmp_path / "cal"), "ivfpq", {"nlist": 8, "nbits": 6,
               "on_disk": True, "nprobe": 8}, "cpu", str(tmp_path / "index"))
    assert info["calibrated"] and 0 < info["images/recall_at_10"] <= 1 and 0 < info["texts/recall_at_10"] <= 1
    images = load_index(tmp_path / "index" / "images", expect_dim=65, expect_count=1500)
    assert (tmp_path / "index" / "images" / "lists.ivfdata").is_file()
    assert images.faiss_index.pq.M == 5 and load_index(tmp_path / "index" / "texts").faiss_index.pq.M == 8
    assert images.build_stats["recall_query_source"] == "given queries"
    assert images.build_stats["recall_queries"] == 1000
    queries = np.concatenate([both[1500:1510], np.ones((10, 1), np.float32)], axis=1)
    truth = torch_topk_rows(np.concatenate([both[:1500], np.full((1500, 1), -0.1, np.float32)], 1), queries, 10)
    assert naive_recall(images.search(queries, 10)[1], truth) > 0.3
