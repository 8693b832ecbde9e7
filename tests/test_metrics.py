"""Metrics against a brute-force Python reference, ties and many positives included."""
import statistics

import pytest
import torch

from cmr.errors import DataError
from cmr.retrieval.metrics import (
    positives_from_labels,
    positives_identity,
    positives_instance,
    recall_curve,
    retrieval_metrics,
)


def reference_metrics(scores, positives, ks):
    """One query at a time, plain Python: sort by (score desc, negatives before positives)."""
    first, aps, inps = [], [], []
    for s_row, p_row in zip(scores.tolist(), positives.tolist()):
        ranked = [p for _, p in sorted(zip(s_row, p_row), key=lambda sp: (-sp[0], sp[1]))]
        pos_ranks = [i + 1 for i, p in enumerate(ranked) if p]
        first.append(pos_ranks[0])
        aps.append(sum((n + 1) / r for n, r in enumerate(pos_ranks)) / len(pos_ranks))
        inps.append(len(pos_ranks) / pos_ranks[-1])
    out = {f"R@{k}": sum(r <= k for r in first) / len(first) for k in ks}
    out.update(MdR=statistics.median(first), MnR=sum(first) / len(first),
               mAP=sum(aps) / len(aps), mINP=sum(inps) / len(inps))
    return out


def random_case(seed, q=37, g=53, levels=None, max_pos=4):
    gen = torch.Generator().manual_seed(seed)
    if levels:  # few distinct values: many ties
        scores = torch.randint(0, levels, (q, g), generator=gen).float()
    else:
        scores = torch.randn(q, g, generator=gen)
    positives = torch.zeros(q, g, dtype=torch.bool)
    for i in range(q):
        n = int(torch.randint(1, max_pos + 1, (1,), generator=gen))
        positives[i, torch.randperm(g, generator=gen)[:n]] = True
    return scores, positives


@pytest.mark.parametrize("seed,levels,max_pos", [(0, None, 1), (1, None, 5), (2, 3, 1), (3, 4, 6), (4, 2, 20)])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_matches_brute_force(seed, levels, max_pos, chunk_size):
    scores, positives = random_case(seed, levels=levels, max_pos=max_pos)
    ks = (1, 5, 10)
    got = retrieval_metrics(scores, positives, ks, chunk_size=chunk_size)
    want = reference_metrics(scores, positives, ks)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_constant_scores_get_worst_rank():
    positives = positives_instance(torch.tensor([0, 3, 9]), 10)
    m = retrieval_metrics(torch.zeros(3, 10), positives)
    assert m["R@1"] == 0 and m["R@5"] == 0 and m["R@10"] == 1
    assert m["MdR"] == 10 and m["mAP"] == pytest.approx(0.1)


def test_hand_checked_case():
    # Query 0: positives ranked 1 and 3 -> AP (1 + 2/3)/2, INP 2/3. Query 1: positive ranked 2.
    scores = torch.tensor([[0.9, 0.5, 0.7, 0.1], [0.2, 0.8, 0.1, 0.9]])
    positives = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    m = retrieval_metrics(scores, positives, ks=(1, 2))
    assert m["R@1"] == 0.5 and m["R@2"] == 1.0
    assert m["MdR"] == 1.5 and m["MnR"] == 1.5
    assert m["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)
    assert m["mINP"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_image_to_text_with_five_captions_per_image():
    text_item = torch.arange(4).repeat_interleave(5)  # 20 captions, 5 per image
    t2i = positives_instance(text_item, 4)
    i2t = t2i.T
    assert i2t.shape == (4, 20) and (i2t.sum(1) == 5).all()
    scores = torch.randn(4, 20)
    scores[0, 4] = 10.0  # image 0: one of its captions on top is enough for R@1
    assert retrieval_metrics(scores, i2t, ks=(1,))["R@1"] >= 0.25


def test_label_and_identity_positives():
    q = torch.tensor([[1, 0, 0], [0, 1, 1]])
    g = torch.tensor([[1, 1, 0], [0, 0, 1], [0, 0, 0]])
    assert positives_from_labels(q, g).tolist() == [[True, False, False], [True, True, False]]
    assert positives_identity(["a", "b"], ["b", "a", "b"]).tolist() == [[False, True, False], [True, False, True]]
    assert positives_identity(torch.tensor([3]), torch.tensor([3, 4])).tolist() == [[True, False]]


def test_recall_curve_agrees_with_metrics():
    scores, positives = random_case(7, levels=5, max_pos=3)
    curve = recall_curve(scores, positives, max_k=12)
    m = retrieval_metrics(scores, positives, ks=range(1, 13))
    assert curve == pytest.approx([m[f"R@{k}"] for k in range(1, 13)])
    assert all(a <= b for a, b in zip(curve, curve[1:]))


def test_queries_without_positive_are_an_error_that_counts_them():
    positives = torch.zeros(4, 6, dtype=torch.bool)
    positives[1, 2] = True
    with pytest.raises(DataError, match="3 of 4 queries"):
        retrieval_metrics(torch.randn(4, 6), positives)


def test_bad_inputs():
    with pytest.raises(DataError, match="query_item"):
        positives_instance(torch.tensor([0, 5]), 5)
    with pytest.raises(DataError, match="same shape"):
        retrieval_metrics(torch.randn(2, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(DataError, match="finite"):
        retrieval_metrics(torch.tensor([[float("nan"), 1.0]]), torch.tensor([[True, False]]))
    with pytest.raises(DataError, match=r"scores: breaks rule 'at least one query'.*\(0, 5\)"):
        retrieval_metrics(torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool))


def test_class_positives_take_labels_of_any_dtype():
    from cmr.retrieval.evaluation import positives_t2i

    labels = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1]])
    text_item = torch.tensor([2, 0, 1, 1])
    want = [[False, True, True], [True, False, False], [False, True, True], [False, True, True]]
    for dtype in (torch.bool, torch.int64, torch.float32):
        assert positives_t2i(text_item, 3, "class", labels=labels.to(dtype)).tolist() == want, dtype


def test_large_matrix_fits_in_chunks():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2000, 3000, generator=gen)
    positives = positives_instance(torch.randint(0, 3000, (2000,), generator=gen), 3000)
    scores[positives] += 3.0
    m = retrieval_metrics(scores, positives)
    assert 0.0 < m["R@1"] < m["R@5"] <= m["R@10"] < 1.0
