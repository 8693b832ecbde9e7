"""Person search on the CUHK-PEDES sample: reader, identity split, identity-level metrics by hand."""
from __future__ import annotations

import pytest
import torch

from cmr.config import Params
from cmr.data.readers import READERS
from cmr.retrieval.evaluation import positives_t2i
from cmr.retrieval.metrics import retrieval_metrics
from cmr.studies.tbps import dedupe_images, identity_splits
from cmr.training.features import identity_vector


@pytest.fixture(scope="module")
def sample(shared_datasets):
    return READERS.get("cuhk_pedes")(shared_datasets / "cuhk_pedes_sample", skip_missing_images=True).items


def test_reader_and_dedupe_on_the_sample(sample):
    assert len(sample) == 36  # items.jsonl of the sample: 36 (caption file, image) pairs
    assert len({it.identity for it in sample}) == 9  # person 0005 under two caption-file ids
    items = dedupe_images(sample)
    assert len(items) == 32 and len({it.image for it in items}) == 32
    persons = {}
    for it in items:
        persons.setdefault(it.identity, set()).add(it.image.split("/")[-1][:4])
    assert len(persons) == 8 and all(len(v) == 1 for v in persons.values())  # one CUHK01 person per id


def test_identity_split_keeps_each_person_in_one_split(sample):
    items = identity_splits(dedupe_images(sample), 0.1, 0.15, seed=0)
    split_of = {}
    for it in items:
        assert split_of.setdefault(it.identity, it.split) == it.split
    counts = {s: sum(v == s for v in split_of.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 4, "val": 2, "test": 2}
    assert [it.split for it in identity_splits(dedupe_images(sample), 0.1, 0.15, seed=0)] == [it.split for it in items]


def test_identity_metrics_match_a_hand_computation(sample):
    """Three persons (12 images); two text queries with hand-placed rankings."""
    items = [it for it in dedupe_images(sample)]
    ids = sorted({it.identity for it in items})[:3]
    gallery = [it for pid in ids for it in items if it.identity == pid]  # A0..A3, B0..B3, C0..C3
    identity = identity_vector(gallery)
    text_item = torch.tensor([0, 4])  # a caption of A0, a caption of B0
    pos = positives_t2i(text_item, len(gallery), "identity", identity=identity)
    assert pos.sum(1).tolist() == [4, 4]
    # query A: A0, B0, A1, C0, A2, B1, C1, B2, C2, B3, C3, A3 -> positives at ranks 1, 3, 5, 12
    # query B: A0, B0, B1, B2, B3, then the rest -> positives at ranks 2, 3, 4, 5
    rankings = [[0, 4, 1, 8, 2, 5, 9, 6, 10, 7, 11, 3], [0, 4, 5, 6, 7, 1, 2, 3, 8, 9, 10, 11]]
    scores = torch.zeros(2, 12)
    for q, order in enumerate(rankings):
        scores[q, order] = torch.linspace(1.0, 0.0, 12)
    m = retrieval_metrics(scores, pos, ks=(1, 5, 10))
    ap_a = (1 / 1 + 2 / 3 + 3 / 5 + 4 / 12) / 4
    ap_b = (1 / 2 + 2 / 3 + 3 / 4 + 4 / 5) / 4
    assert m["mAP"] == pytest.approx((ap_a + ap_b) / 2)
    assert m["mINP"] == pytest.approx((4 / 12 + 4 / 5) / 2)
    assert (m["R@1"], m["R@5"], m["R@10"]) == (pytest.approx(0.5), 1.0, 1.0)


@pytest.mark.slow
def test_quick_tbps_study_runs(tmp_path, monkeypatch, shared_datasets):
    from cmr.studies.tbps import run

    monkeypatch.chdir(tmp_path)
    p = Params.model_validate({
        "data": {"reader": "cuhk_pedes", "source": str(shared_datasets / "cuhk_pedes_sample"),
                 "options": {"skip_missing_images": True}},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
        "paths": {"cache": str(tmp_path / "cache"), "finetuned": str(tmp_path / "none")}})
    out = run(p, quick=True)
    assert [r["row"] for r in out["rows"]] == ["baseline InfoNCE", "N-ITC", "+ augmentation"]
    for r in out["rows"]:
        assert 0 <= r["t2i/mINP"] <= 100 and 0 <= r["t2i/mAP"] <= 100
    assert (tmp_path / "studies/tbps-quick/table.md").is_file() and (tmp_path / "studies/tbps-quick/plot.png").is_file()
