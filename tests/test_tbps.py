"""Person search on the CUHK-PEDES sample: reader, identity split, identity-level metrics by hand."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cmr.config import Params
from cmr.data.readers import READERS
from cmr.retrieval.evaluation import positives_t2i
from cmr.retrieval.metrics import retrieval_metrics
from cmr.errors import ConfigError
from cmr.losses import LossInputs, build_loss
from cmr.models.feature_heads import FeatureHeads
from cmr.studies.tbps import dedupe_images, identity_splits
from cmr.training.tricks import SoftLabel, TrickHeads, fix_temperature
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


def _heads(dropout=0.0, keep_teacher=False):
    torch.manual_seed(0)
    return TrickHeads(FeatureHeads(6, 5, 4, "mlp"), dropout, keep_teacher)


def test_trick_heads_drop_text_features_only_while_training():
    heads, img, txt = _heads(dropout=0.5, keep_teacher=True), torch.randn(8, 6), torch.randn(8, 5)
    heads.eval()
    torch.testing.assert_close(heads.head_text(txt), heads.model.head_text(txt))  # eval: no dropout
    assert heads.teacher == {}  # and no teacher pass
    heads.train()
    torch.testing.assert_close(heads.head_image(img), heads.model.head_image(img))  # images never dropped
    student = heads.head_text(txt)
    assert not torch.allclose(student, heads.model.head_text(txt))
    assert not torch.allclose(student, heads.teacher["text"])  # the teacher has its own dropout draw
    assert not heads.teacher["text"].requires_grad
    no_drop = _heads(dropout=0.0, keep_teacher=True).train()
    torch.testing.assert_close(no_drop.head_text(txt), no_drop.teacher["text"])
    with pytest.raises(ConfigError, match="dropout"):
        TrickHeads(FeatureHeads(6, 5, 4), dropout=1.0)


def _naive_soft_nitc(img, txt, t_img, t_txt, scale, identity, alpha):
    """Row by row: targets (1 - alpha) * uniform over same-identity pairs + alpha * teacher softmax."""
    total = 0.0
    for a, b, ta, tb in ((img, txt, t_img, t_txt), (txt, img, t_txt, t_img)):
        for i in range(len(a)):
            logits = [scale * float(a[i] @ b[j]) for j in range(len(b))]
            t_logits = [scale * float(ta[i] @ tb[j]) for j in range(len(b))]
            same = [float(identity[i] == identity[j]) for j in range(len(b))]
            z, tz = math.log(sum(math.exp(v) for v in logits)), math.log(sum(math.exp(v) for v in t_logits))
            for j in range(len(b)):
                q = (1 - alpha) * same[j] / sum(same) + alpha * math.exp(t_logits[j] - tz)
                total -= q * (logits[j] - z) / (2 * len(a))
    return total


def test_soft_label_matches_naive_targets_and_ramps():
    torch.manual_seed(1)
    heads = _heads()
    identity = torch.tensor([0, 0, 1, 2, 2, 2])
    img, txt = F.normalize(torch.randn(6, 4), dim=1), F.normalize(torch.randn(6, 4), dim=1)
    t_img, t_txt = F.normalize(torch.randn(6, 4), dim=1), F.normalize(torch.randn(6, 4), dim=1)
    heads.teacher = {"image": t_img, "text": t_txt}
    loss = SoftLabel(build_loss({"nitc": 1.0}, {}, 4, 3), heads, ratio=0.5, warmup_steps=4).train()
    inputs = LossInputs(img, txt, torch.tensor(10.0), torch.arange(6), identity=identity)
    for step in range(6):  # alpha: 0, 0.125, 0.25, 0.375, 0.5, 0.5
        alpha = 0.5 * min(1.0, step / 4)
        total, parts = loss(inputs)
        assert total.item() == pytest.approx(_naive_soft_nitc(img, txt, t_img, t_txt, 10.0, identity, alpha), rel=1e-5)
    assert loss.alpha() == 0.5 and "soft" in parts
    loss.eval()  # validation passes: plain N-ITC
    assert loss(inputs)[0].item() == pytest.approx(_naive_soft_nitc(img, txt, t_img, t_txt, 10.0, identity, 0.0),
                                                   rel=1e-5)


def test_soft_label_with_teacher_equal_to_student_only_scales_nitc_gradient():
    """E_p[grad log p] = 0: the self-distillation term adds no gradient, so the trick is (1 - a) * N-ITC."""
    torch.manual_seed(2)
    identity = torch.tensor([0, 1, 1, 2])
    img = F.normalize(torch.randn(4, 4), dim=1).requires_grad_()
    txt = F.normalize(torch.randn(4, 4), dim=1).requires_grad_()
    heads = _heads()
    heads.teacher = {"image": img.detach(), "text": txt.detach()}
    loss = SoftLabel(build_loss({"nitc": 1.0}, {}, 4, 3), heads, ratio=0.3, warmup_steps=1).train()
    loss.step = 1
    inputs = LossInputs(img, txt, torch.tensor(20.0), torch.arange(4), identity=identity)
    soft_grad = torch.autograd.grad(loss(inputs)[0], (img, txt))
    hard_grad = torch.autograd.grad(build_loss({"nitc": 1.0}, {}, 4, 3)(inputs)[0], (img, txt))
    for s, h in zip(soft_grad, hard_grad):
        torch.testing.assert_close(s, 0.7 * h)


def test_soft_label_and_temperature_reject_bad_settings():
    heads = _heads()
    with pytest.raises(ConfigError, match="needs the nitc"):
        SoftLabel(build_loss({"infonce": 1.0}, {}, 4, 3), heads, 0.5, 1)
    with pytest.raises(ConfigError, match="softlabel_ratio"):
        SoftLabel(build_loss({"nitc": 1.0}, {}, 4, 3), heads, 0.0, 1)
    with pytest.raises(ConfigError, match="temperature"):
        fix_temperature(heads.model, 0.0)
    fix_temperature(heads.model, 0.02)
    assert not heads.logit_scale.requires_grad and heads.logit_scale.exp().item() == pytest.approx(50.0)


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
    assert [r["row"] for r in out["rows"]] == ["baseline InfoNCE", "N-ITC", "+ augmentation", "N-ITC + dropout",
                                               "N-ITC + soft label", "N-ITC + fixed temperature"]
    assert out["rows"][-1]["tricks"] == "dropout 0.05, softlabel_ratio 0.5, temperature 0.02"
    for r in out["rows"]:
        assert 0 <= r["t2i/mINP"] <= 100 and 0 <= r["t2i/mAP"] <= 100
    assert (tmp_path / "studies/tbps-quick/table.md").is_file() and (tmp_path / "studies/tbps-quick/plot.png").is_file()
