"""CLIP4CMR mode on precomputed features, and the Wikipedia / imbalance / sensitivity studies on real data."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cmr.losses import build_loss
from cmr.errors import ConfigError, DataError
from cmr.models.feature_heads import (FeatureHeads, PosteriorHeads, WithUnpaired, class_logits, feature_heads_for,
                                       hellinger, knn_label_votes)
from cmr.studies.clip4cmr import drop_modality
from cmr.training.features import FeatureSet

WIKI = Path("/work/shared/datasets/wikipedia_cmr")
needs_wiki = pytest.mark.skipif(not (WIKI / "wikipedia_cmr.npz").is_file(), reason="wikipedia_cmr not available")


@pytest.fixture(autouse=True)
def _wiki_env(monkeypatch):
    monkeypatch.setenv("CMR_WIKIPEDIA", str(WIKI))


@pytest.fixture(scope="module")
def wiki():
    from cmr.studies.wikipedia import wikipedia_splits

    return wikipedia_splits(0.1, 0)[0]


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_feature_heads_shapes_unit_norm_and_grad(head):
    torch.manual_seed(0)
    img, txt = torch.rand(6, 128), torch.rand(6, 10)
    stats = lambda x: (x.mean(0), x.std(0))
    model = FeatureHeads(128, 10, 32, head, image_stats=stats(img), text_stats=stats(txt))
    a, b = model.head_image(img), model.head_text(txt)
    assert a.shape == (6, 32) and b.shape == (6, 32)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(b.norm(dim=1), torch.ones(6))
    (a @ b.T * model.logit_scale.exp()).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert model.embed_dim == 32 and math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)


def test_standardisation_uses_train_statistics():
    x = torch.tensor([[0.0, 5.0], [2.0, 5.0], [4.0, 5.0]])  # column 2 constant: std 0 must not divide
    model = feature_heads_for(FeatureSet(x, x, torch.arange(3)), 4, "linear")
    z = model.norm_image(x)
    torch.testing.assert_close(z[:, 0], torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(z[:, 1], torch.zeros(3))


def test_frozen_temperature_stays_fixed():
    model = FeatureHeads(3, 3, 4, "linear", temperature=0.2, learn_scale=False)
    assert not model.logit_scale.requires_grad and math.isclose(model.logit_scale.exp().item(), 5.0, rel_tol=1e-6)


def test_drop_modality_keeps_pairs_and_unpaired_partners():
    labels = torch.eye(3)[torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])]
    fs = FeatureSet(torch.arange(10.0)[:, None], 100 + torch.arange(10.0)[:, None], torch.arange(10), labels)
    paired, unpaired = drop_modality(fs, "image", 30, seed=0)
    assert paired.image.shape[0] == 3 and paired.text.shape[0] == 3
    kept = set(paired.image[:, 0].long().tolist())
    assert set((paired.text[:, 0] - 100).long().tolist()) == kept  # still paired row by row
    texts, text_labels = unpaired["text"]
    owners = (texts[:, 0] - 100).long()
    assert set(owners.tolist()) == set(range(10)) - kept and "image" not in unpaired
    torch.testing.assert_close(text_labels, labels[owners])
    _p, only_image = drop_modality(fs, "text", 30, seed=0)
    assert set(only_image["image"][0][:, 0].long().tolist()) == set(range(10)) - kept
    assert drop_modality(fs, "image", 100, seed=0)[1] == {}


def test_with_unpaired_adds_row_wise_terms_only():
    torch.manual_seed(0)
    model = FeatureHeads(4, 4, 8, "linear")
    labels = torch.eye(2)[torch.tensor([0, 1, 0, 1])]
    from cmr.losses import LossInputs

    inputs = LossInputs(model.head_image(torch.randn(4, 4)), model.head_text(torch.randn(4, 4)),
                        model.logit_scale.exp(), torch.arange(4), labels=labels)
    extra = {"image": (torch.randn(5, 4), torch.eye(2)[torch.tensor([0, 1, 1, 0, 1])])}
    pair_only = WithUnpaired(build_loss({"infonce": 1.0}, {}, 8, 2), model, extra["image"], None, batch_size=4,
                             gen=torch.Generator().manual_seed(0))
    total, parts = pair_only(inputs)
    assert "unpaired" not in parts
    mixed = WithUnpaired(build_loss({"infonce": 1.0, "ce": 1.0}, {}, 8, 2), model, extra["image"], None,
                         batch_size=4, gen=torch.Generator().manual_seed(0))
    total, parts = mixed(inputs)
    assert parts["unpaired"] > 0
    assert math.isclose(total.item(), parts["infonce"] + parts["ce"] + parts["unpaired"], rel_tol=1e-5)
    assert not any(p is q for p in mixed.parameters() for q in model.parameters())


@needs_wiki
def test_wikipedia_splits_follow_source_and_carve_val(wiki):
    assert wiki["test"].image.shape == (693, 128) and wiki["test"].text.shape == (693, 10)
    assert wiki["train"].image.shape[0] + wiki["val"].image.shape[0] == 2173
    assert 0.08 < wiki["val"].image.shape[0] / 2866 < 0.12
    assert wiki["train"].labels.shape[1] == 10


@needs_wiki
def test_trained_heads_beat_random_ranking_on_wikipedia(wiki):
    """Random scores give mAP near the class prior (~0.11 for 10 classes); training must clear it by far."""
    from cmr.studies.wikipedia import DEFAULTS, class_map, train_objective

    torch.manual_seed(0)
    untrained = class_map(feature_heads_for(wiki["train"], 64, "linear"), wiki["test"])
    hp = dict(DEFAULTS, head="mlp", lr=1e-3, tau_kind=None, tau=None, epochs=3, embed_dim=64)
    _val, test, _epoch = train_objective(wiki, {"ce": 1.0}, hp, seed=0)
    prior = (wiki["test"].labels.sum(0) / 693).pow(2).sum().item()  # expected precision of a random ranking
    assert 0.1 < prior < 0.13
    assert test["i2t"] > prior + 0.1 and test["t2i"] > prior + 0.07
    assert test["avg"] > untrained["avg"] + 0.05


def _naive_votes(queries, bank, labels, k, temperature):
    """One query at a time, in plain Python: the reference for knn_label_votes."""
    out = []
    for q in queries.double():
        sims = [(float(q @ b / (q.norm() * b.norm())), i) for i, b in enumerate(bank.double())]
        sims = sorted((pair for pair in sims if pair[0] < 1 - 1e-6), reverse=True)[:k]
        votes = [0.0] * labels.shape[1]
        for s, i in sims:
            for c in range(labels.shape[1]):
                votes[c] += math.exp((s - 1) / temperature) * float(labels[i, c]) / float(labels[i].sum())
        out.append([v / sum(votes) for v in votes])
    return torch.tensor(out)


@needs_wiki
def test_knn_votes_match_naive_reference_and_skip_self(wiki):
    bank, labels = hellinger(wiki["train"].image[:300]), wiki["train"].labels[:300]
    queries = hellinger(wiki["val"].image[:20])
    got = knn_label_votes(queries, bank, labels, 7, 0.05)
    assert torch.allclose(got, _naive_votes(queries, bank, labels, 7, 0.05).float(), atol=1e-5)
    assert torch.allclose(got.sum(1), torch.ones(20))
    # bank = queries: with k = 1 each row gets its nearest *other* row's label, never its own
    own = knn_label_votes(bank[:50], bank[:50], labels[:50], 1, 0.05)
    sims = torch.nn.functional.normalize(bank[:50], dim=1) @ torch.nn.functional.normalize(bank[:50], dim=1).T
    nearest_other = sims.fill_diagonal_(-2).argmax(1)
    assert torch.equal(own, labels[:50][nearest_other].float())


def test_knn_votes_and_hellinger_reject_bad_input():
    x = torch.rand(5, 3)
    with pytest.raises(ConfigError, match="knn k"):
        knn_label_votes(x, x, torch.eye(3)[[0, 1, 2, 0, 1]], 5, 0.1)
    with pytest.raises(DataError, match="row 1"):
        hellinger(torch.tensor([[0.2, 0.8], [0.5, -0.1]]))
    assert torch.allclose(hellinger(torch.tensor([[0.25, 0.0, 0.75]])) ** 2, torch.tensor([[0.25, 0.0, 0.75]]))


def test_posterior_scores_are_probabilities_of_sharing_a_class():
    torch.manual_seed(3)
    model = FeatureHeads(5, 4, 8, "mlp")
    ce = build_loss({"ce": 1.0, "center": 0.1}, {}, 8, 3)
    logits = class_logits(ce)
    assert logits is ce.losses["ce"].classifier  # centre + CE: the CE classifier
    post = PosteriorHeads(model, logits, t_image=0.5, t_text=2.0)
    img, txt = torch.randn(4, 5), torch.randn(6, 4)
    with torch.no_grad():
        p_img, p_txt = post.head_image(img), post.head_text(txt)
    torch.testing.assert_close(p_img.sum(1), torch.ones(4))
    torch.testing.assert_close(p_txt, torch.softmax(logits(model.head_text(txt)) / 2.0, dim=1).detach())
    for i in range(4):  # score = sum over classes of P(image in c) P(text in c)
        for t in range(6):
            same = sum(float(p_img[i, c]) * float(p_txt[t, c]) for c in range(3))
            assert float(p_img[i] @ p_txt[t]) == pytest.approx(same, rel=1e-5)
    with pytest.raises(ConfigError, match="temperatures"):
        PosteriorHeads(model, logits, 0.0, 1.0)


def test_class_logits_of_prototype_and_proxy_losses():
    torch.manual_seed(4)
    x = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    proto = build_loss({"prototype": 1.0}, {}, 8, 3)
    p = proto.losses["prototype"].prototypes
    # fixed unit prototypes: softmax(2 cos) = softmax(-||x - p||^2), PAN's distance form
    dist = ((x[:, None, :] - p[None]) ** 2).sum(-1)
    torch.testing.assert_close(class_logits(proto)(x).softmax(1), (-dist).softmax(1))
    nca = build_loss({"proxy_nca": 1.0}, {}, 8, 3)
    proxies = torch.nn.functional.normalize(nca.losses["proxy_nca"].proxies, dim=1)
    torch.testing.assert_close(class_logits(nca)(x), -9.0 * ((x[:, None, :] - proxies[None]) ** 2).sum(-1))
    assert class_logits(build_loss({"infonce": 1.0}, {}, 8, 3)) is None


@needs_wiki
def test_scorers_offer_posteriors_only_with_class_logits(wiki, monkeypatch):
    from cmr.studies import wikipedia
    from cmr.studies.wikipedia import DEFAULTS, POSTERIOR_T, class_map, fit_objective, scorers, train_objective

    hp = dict(DEFAULTS, head="mlp", lr=1e-3, tau_kind=None, tau=None, epochs=1, embed_dim=64)
    model, loss_fn, _epoch = fit_objective(wiki, {"ce": 1.0}, hp, seed=0)
    named = scorers(model, loss_fn)
    assert len(named) == 1 + len(POSTERIOR_T) ** 2 and named["cosine"] is model
    assert scorers(model, build_loss({"infonce": 1.0}, {}, 64, 10)).keys() == {"cosine"}
    # train_objective scores as hp["scoring"] says (the fit itself is the one above)
    monkeypatch.setattr(wikipedia, "fit_objective", lambda *_a, **_k: (model, loss_fn, 1))
    val, _test, _ = train_objective(wiki, {"ce": 1.0}, dict(hp, scoring="posterior 0.5/0.25"), seed=0)
    assert val == class_map(named["posterior 0.5/0.25"], wiki["val"])
    assert train_objective(wiki, {"ce": 1.0}, hp, seed=0)[0] == class_map(model, wiki["val"])


def _quick(name, tmp_path, monkeypatch):
    from cmr.config import load_params
    from cmr.studies import load_all

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = load_params(repo / "params.yaml", {"tracking.uri": uri, "data.source": str(repo / "data/raw/openclipart_mini"),
                                           "paths.cache": str(repo / "data/cache")})
    result = load_all().get(name)(p, quick=True)
    for f in ("table.csv", "table.md", "plot.png"):
        assert (tmp_path / "studies" / f"{name}-quick" / f).stat().st_size > 100
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[p.tracking.experiment], output_format="list")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result["run_id"]]
    assert len(children) >= 4 and any(r.info.run_id == result["run_id"] for r in runs)
    return result


@needs_wiki
@pytest.mark.slow
def test_wikipedia_study_quick(tmp_path, monkeypatch):
    result = _quick("wikipedia", tmp_path, monkeypatch)
    table = (tmp_path / "studies/wikipedia-quick/table.md").read_text()
    assert "JFSSL (published)" in table and "0.3063" in table
    assert all(v["avg"][0] > 0.15 for v in result["summary"].values())


@needs_wiki
@pytest.mark.slow
def test_imbalance_study_quick(tmp_path, monkeypatch):
    result = _quick("clip4cmr_imbalance", tmp_path, monkeypatch)
    assert any(k.startswith("openclipart/") for k in result["curves"])


@needs_wiki
@pytest.mark.slow
def test_sensitivity_study_quick(tmp_path, monkeypatch):
    result = _quick("clip4cmr_sensitivity", tmp_path, monkeypatch)
    assert set(result["spread"]) >= {"wikipedia/lr", "openclipart/lr"}
