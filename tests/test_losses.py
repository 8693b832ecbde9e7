"""Losses: registry-wide properties, then one defining property per loss on a hand-checked case."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cmr.errors import ConfigError
from cmr.losses import LOSSES, LossInputs, build_loss, sinkhorn_biases
from cmr.losses.pairwise import multi_positive_nce

B, D, C = 12, 16, 5


def unit(x):
    return F.normalize(x, dim=1)


def eye_rows(idx, dim=D):
    """Rows of the identity: standard basis vectors e_idx, [len(idx), dim]."""
    return torch.eye(dim)[torch.as_tensor(idx)]


def make(image, text, scale=1.0, item=None, labels=None, identity=None):
    n = image.shape[0]
    item = torch.arange(n) if item is None else torch.as_tensor(item)
    return LossInputs(image, text, torch.tensor(float(scale)), item, labels,
                      None if identity is None else torch.as_tensor(identity))


def total_of(combined, inputs) -> float:
    return float(combined(inputs)[0].detach())


def loss_value(name, inputs, num_classes=C, **options):
    loss = build_loss({name: 1.0}, {name: options} if options else {}, inputs.image.shape[1], num_classes)
    return loss(inputs)[0].detach()


@pytest.fixture
def batch():
    """Random batch with a duplicated item, multi-hot labels (one row unlabelled) and identities."""
    g = torch.Generator().manual_seed(0)
    raw_i = torch.randn(B, D, generator=g, requires_grad=True)
    raw_t = torch.randn(B, D, generator=g, requires_grad=True)
    labels = (torch.rand(B, C, generator=g) < 0.35).float()
    labels[torch.arange(B), torch.arange(B) % C] = 1.0
    labels[3] = 0.0
    item = torch.arange(B)
    item[5] = item[4]  # the same image captioned twice
    identity = torch.arange(B) % 4
    scale = torch.tensor(10.0, requires_grad=True)
    return raw_i, raw_t, scale, item, labels, identity


def inputs_of(batch, perm=None, swap=False):
    raw_i, raw_t, scale, item, labels, identity = batch
    image, text = unit(raw_i), unit(raw_t)
    if swap:
        image, text = text, image
    if perm is not None:
        image, text, item, labels, identity = image[perm], text[perm], item[perm], labels[perm], identity[perm]
    return LossInputs(image, text, scale, item, labels, identity)


# ------------------------------------------------------------------ every registered loss
@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_is_finite_scalar_with_gradients(name, batch):
    torch.manual_seed(0)
    combined = build_loss({name: 1.0}, {}, D, C)
    total, parts = combined(inputs_of(batch))
    assert total.shape == () and torch.isfinite(total) and set(parts) == {name}
    assert parts[name] == pytest.approx(float(total.detach()))
    total.backward()
    raw_i, raw_t = batch[0], batch[1]
    for grad in (raw_i.grad, raw_t.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    for pname, p in combined.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_is_invariant_to_batch_order_and_modality_swap(name, batch):
    torch.manual_seed(0)
    combined = build_loss({name: 1.0}, {}, D, C)
    base = combined(inputs_of(batch))[0]
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(combined(inputs_of(batch, perm=perm))[0], base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(combined(inputs_of(batch, swap=True))[0], base, rtol=1e-5, atol=1e-5)


def test_losses_run_in_float32_under_autocast(batch):
    combined = build_loss({"infonce": 1.0, "ncl": 1.0, "ce": 1.0}, {}, D, C)
    plain = combined(inputs_of(batch))[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inputs = inputs_of(batch)
        half = LossInputs(inputs.image.bfloat16(), inputs.text.bfloat16(), inputs.logit_scale, inputs.item,
                          inputs.labels, inputs.identity)
        mixed = combined(half)[0]
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, rtol=2e-2, atol=2e-2)  # only the bf16 rounding of the inputs


# ------------------------------------------------------------------ pair-wise
def test_infonce_hand_values():
    e = eye_rows([0, 1])
    # 2x2, scale 1: each row/column is softmax([1, 0]) -> log(1 + e^-1)
    assert float(loss_value("infonce", make(e, e, 1.0))) == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)
    # aligned orthonormal pairs at a large scale: ~0
    big = eye_rows(range(8))
    assert float(loss_value("infonce", make(big, big, 100.0))) < 1e-6


def test_infonce_counts_duplicate_items_as_positives():
    e = eye_rows([0, 1])
    # both pairs are one item: each row targets [1/2, 1/2] -> -1/2 log p0 - 1/2 log p1 = log(1 + e) - 1/2
    dup = float(loss_value("infonce", make(e, e, 1.0, item=[0, 0])))
    assert dup == pytest.approx(math.log1p(math.e) - 0.5, abs=1e-6)
    # as two items, each row would target its diagonal only
    assert float(loss_value("infonce", make(e, e, 1.0))) != pytest.approx(dup, abs=1e-3)


def test_triplet_is_zero_when_positives_beat_hardest_negatives_by_margin():
    e = eye_rows(range(6))
    assert float(loss_value("triplet", make(e, e), margin=0.2)) == 0.0
    # cos 1 vs 0: margin 1.5 is violated by 0.5 in both directions for every pair
    assert float(loss_value("triplet", make(e, e), margin=1.5)) == pytest.approx(1.0, abs=1e-6)


def test_triplet_hand_value_and_duplicates():
    image = eye_rows([0, 1])
    text = unit(torch.stack([eye_rows([0])[0], eye_rows([0])[0] + eye_rows([1])[0]]))
    # sims [[1, .707], [0, .707]]: only text 1 vs its hardest negative image 0 violates: 0.2 - .707 + .707
    assert float(loss_value("triplet", make(image, text), margin=0.2)) == pytest.approx(0.2 / 2, abs=1e-6)
    # as one item there are no negatives at all
    assert float(loss_value("triplet", make(image, text, item=[3, 3]), margin=0.2)) == 0.0


def test_triplet_sum_over_negatives_matches_naive_loop(batch):
    inputs = inputs_of(batch)
    fast = float(loss_value("triplet", inputs, margin=0.3, hardest=False))
    s = (inputs.image @ inputs.text.t()).detach()
    pos = inputs.item[:, None] == inputs.item[None, :]
    total, count = 0.0, 0
    for i in range(B):
        for j in range(B):
            if not pos[i, j]:
                continue
            count += 1
            for k in range(B):
                if not pos[i, k]:
                    total += max(0.0, 0.3 - s[i, j].item() + s[i, k].item())
                if not pos[k, j]:
                    total += max(0.0, 0.3 - s[i, j].item() + s[k, j].item())
    assert fast == pytest.approx(total / count, rel=1e-5)


def test_contrastive_hand_values():
    e = eye_rows([0, 1])
    # positives at distance 0, negatives at squared distance 2
    assert float(loss_value("contrastive", make(e, e), margin=0.2)) == 0.0
    assert float(loss_value("contrastive", make(e, e), margin=3.0)) == pytest.approx(2 * (3 - 2) / 2)
    # one shared label makes the cross pairs positives: (2 + 2) / B
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert float(loss_value("contrastive", make(e, e, labels=labels), 2, positives="labels")) == pytest.approx(2.0)


# ------------------------------------------------------------------ class-wise
def _set_identity_head(loss_module, attr, scale):
    layer = getattr(loss_module, attr)
    with torch.no_grad():
        layer.weight.copy_(scale * torch.eye(layer.weight.shape[0], layer.weight.shape[1]))
        layer.bias.zero_()


def test_ce_hand_values():
    y = [0, 1, 2, 1]
    x = eye_rows(y, 4)
    labels = F.one_hot(torch.tensor(y), 4).float()
    for target, expected in [("softmax", math.log1p(3 * math.exp(-2.0))),
                             ("bce", (math.log1p(math.exp(-2.0)) + 3 * math.log(2)) / 4)]:
        combined = build_loss({"ce": 1.0}, {"ce": {"target": target}}, 4, 4)
        _set_identity_head(combined.losses["ce"], "classifier", 2.0)
        assert total_of(combined, make(x, x, labels=labels)) == pytest.approx(expected, abs=1e-6)
    # an unlabelled row does not change the softmax form
    combined = build_loss({"ce": 1.0}, {}, 4, 4)
    _set_identity_head(combined.losses["ce"], "classifier", 2.0)
    extra = make(torch.cat([x, eye_rows([3], 4)]), torch.cat([x, eye_rows([3], 4)]),
                 labels=torch.cat([labels, torch.zeros(1, 4)]))
    assert total_of(combined, extra) == pytest.approx(math.log1p(3 * math.exp(-2.0)), abs=1e-6)


def test_label_regression_hand_values():
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]])
    combined = build_loss({"label_regression": 1.0}, {}, 4, 4)
    _set_identity_head(combined.losses["label_regression"], "regressor", 1.0)
    assert total_of(combined, make(labels, labels, labels=labels)) == 0.0
    # predicting half of every label: mean((y/2 - y)^2) = mean(y) / 4
    half = make(labels / 2, labels / 2, labels=labels)
    assert total_of(combined, half) == pytest.approx(float(labels.mean()) / 4)


def test_prototype_uses_fixed_prototypes():
    combined = build_loss({"prototype": 1.0}, {"prototype": {"init": "orthogonal", "scale": 5.0}}, D, C)
    protos = combined.losses["prototype"].prototypes
    torch.testing.assert_close(protos @ protos.t(), torch.eye(C), atol=1e-5, rtol=0)
    assert list(combined.parameters()) == [] and "losses.prototype.prototypes" in combined.state_dict()
    y = torch.tensor([0, 3, 4])
    x = protos[y]
    value = combined(make(x, x, labels=F.one_hot(y, C).float()))[0]
    assert float(value) == pytest.approx(math.log1p((C - 1) * math.exp(-5.0)), abs=1e-6)
    # the same seed gives the same prototypes; the global RNG does not matter
    torch.manual_seed(123)
    again = build_loss({"prototype": 1.0}, {"prototype": {"init": "orthogonal"}}, D, C)
    torch.testing.assert_close(again.losses["prototype"].prototypes, protos)
    with pytest.raises(ConfigError, match="orthogonal"):
        build_loss({"prototype": 1.0}, {"prototype": {"init": "orthogonal"}}, 4, 8)


def test_proxy_nca_hand_value():
    combined = build_loss({"proxy_nca": 1.0}, {"proxy_nca": {"scale": 3.0}}, C, C)
    with torch.no_grad():
        combined.losses["proxy_nca"].proxies.copy_(torch.eye(C))
    y = torch.tensor([1, 2])
    x = eye_rows(y, C)
    # squared distance 0 to its proxy, 2 to the others
    expected = math.log1p((C - 1) * math.exp(-3.0 * 2))
    assert total_of(combined, make(x, x, labels=F.one_hot(y, C).float())) == pytest.approx(expected, abs=1e-6)


def test_proxy_anchor_matches_naive_formula(batch):
    inputs = inputs_of(batch)
    combined = build_loss({"proxy_anchor": 1.0}, {}, D, C)
    fast = total_of(combined, inputs)
    proxies = unit(combined.losses["proxy_anchor"].proxies.detach())
    x = torch.cat([inputs.image, inputs.text]).detach()
    y = torch.cat([inputs.labels, inputs.labels])
    pos_sum, neg_sum, with_pos = 0.0, 0.0, 0
    for c in range(C):
        s = x @ proxies[c]
        pos = [math.exp(-32 * (s[n].item() - 0.1)) for n in range(len(x)) if y[n, c] > 0]
        neg = [math.exp(32 * (s[n].item() + 0.1)) for n in range(len(x)) if y[n, c] == 0]
        if pos:
            with_pos += 1
            pos_sum += math.log(1 + sum(pos))
        neg_sum += math.log(1 + sum(neg))
    assert fast == pytest.approx(pos_sum / with_pos + neg_sum / C, rel=1e-5)


def test_supcon_treats_shared_labels_as_positives(batch):
    inputs = inputs_of(batch)
    classes = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 0, 1])
    labelled = LossInputs(inputs.image, inputs.text, inputs.logit_scale, torch.arange(B),
                          F.one_hot(classes, C).float(), None)
    supcon = loss_value("supcon", labelled)
    # the same as InfoNCE where every class is one item, and not InfoNCE over distinct items
    torch.testing.assert_close(supcon, multi_positive_nce(labelled.logits(), classes[:, None] == classes[None, :]))
    assert abs(float(supcon) - float(loss_value("infonce", labelled))) > 1e-3


def test_center_hand_values():
    combined = build_loss({"center": 1.0}, {}, C, C)
    with torch.no_grad():
        combined.losses["center"].centers.copy_(torch.eye(C))
    labels = torch.tensor([[1.0, 0, 0, 0, 0], [0, 1, 1, 0, 0]])
    assert total_of(combined, make(eye_rows([0], C).repeat(2, 1), eye_rows([0], C).repeat(2, 1), labels=labels)) \
        == pytest.approx((0 + 0.5 * 2) / 2)  # row 1 is e0 with labels {1, 2}: 1/2 ||e0 - e_c||^2 = 1 for both
    x = eye_rows([0, 1], C)
    assert total_of(combined, make(x, x, labels=torch.eye(C)[:2])) == 0.0


# ------------------------------------------------------------------ person search
def test_nitc_is_infonce_over_identities(batch):
    inputs = inputs_of(batch)
    distinct = LossInputs(inputs.image, inputs.text, inputs.logit_scale, torch.arange(B), None, inputs.identity)
    by_identity = LossInputs(inputs.image, inputs.text, inputs.logit_scale, inputs.identity)
    torch.testing.assert_close(loss_value("nitc", distinct), loss_value("infonce", by_identity))


def test_sdm_is_zero_when_similarities_match_identity_distribution():
    same = eye_rows([0, 0, 0])
    assert float(loss_value("sdm", make(same, same, 5.0, identity=[7, 7, 7]))) == pytest.approx(0.0, abs=1e-7)
    # two people, two views each, similarities 1 within a person and 0 across at scale 50
    x = eye_rows([0, 0, 1, 1])
    assert float(loss_value("sdm", make(x, x, 50.0, item=[0, 1, 2, 3], identity=[0, 0, 1, 1]))) < 1e-6
    # the same batch as four strangers is far from its target
    assert float(loss_value("sdm", make(x, x, 50.0, identity=[0, 1, 2, 3]))) > 1.0


def test_ritc_hand_value():
    x = eye_rows([0, 0, 1, 1])
    # p = [1/2, 1/2, 0, 0]; q_eps = (q + 0.01) / 1.04 -> KL = log(0.5 / (0.51 / 1.04))
    value = loss_value("ritc", make(x, x, 50.0, identity=[0, 0, 1, 1]))
    assert float(value) == pytest.approx(math.log(1.04 / 1.02), abs=1e-6)


def test_id_hand_value():
    combined = build_loss({"id": 1.0}, {}, 4, 4)
    _set_identity_head(combined.losses["id"], "classifier", 3.0)
    x = eye_rows([2, 0], 4)
    assert total_of(combined, make(x, x, identity=[2, 0])) == pytest.approx(math.log1p(3 * math.exp(-3.0)), abs=1e-6)


# ------------------------------------------------------------------ NCL
def test_sinkhorn_biases_give_a_doubly_normalised_plan():
    g = torch.Generator().manual_seed(3)
    logits = 10 * unit(torch.randn(B, D, generator=g)) @ unit(torch.randn(B, D, generator=g)).t()
    logits.requires_grad_(True)
    a, b = sinkhorn_biases(logits, 200)
    assert not a.requires_grad and not b.requires_grad
    plan = torch.exp(logits.detach() + a[:, None] + b[None, :])
    torch.testing.assert_close(plan.sum(0), torch.ones(B), atol=1e-4, rtol=0)
    torch.testing.assert_close(plan.sum(1), torch.ones(B), atol=1e-4, rtol=0)
    # every text's retrieval probability summed over image queries is 1
    retrieval = torch.softmax(logits.detach() + b[None, :], dim=1)
    torch.testing.assert_close(retrieval.sum(0), torch.ones(B), atol=1e-4, rtol=0)
    # plain softmax is far from that
    assert (torch.softmax(logits.detach(), dim=1).sum(0) - 1).abs().max() > 0.1


def test_ncl_reduces_to_infonce_on_a_balanced_batch(batch):
    perm = torch.tensor([2, 0, 3, 1, 5, 4])
    image = eye_rows(range(6))
    text = unit(eye_rows(range(6)) + 0.5 * eye_rows(perm))  # a circulant-like pattern: equal row and column sums
    balanced = make(image, text, 8.0)
    torch.testing.assert_close(loss_value("ncl", balanced), loss_value("infonce", balanced))
    inputs = inputs_of(batch)
    assert abs(float(loss_value("ncl", inputs)) - float(loss_value("infonce", inputs))) > 1e-3


def test_ncl_biases_push_down_a_hub():
    g = torch.Generator().manual_seed(5)
    image = unit(torch.randn(8, D, generator=g))
    text = unit(image + 0.3 * torch.randn(8, D, generator=g))
    text[0] = unit(image.mean(0, keepdim=True))[0]  # text 0 is close to every image
    combined = build_loss({"ncl": 1.0}, {"ncl": {"iterations": 50}}, D, 0)
    text_bias, _ = combined.losses["ncl"].gallery_biases(make(image, text, 20.0).logits())
    assert int(text_bias.argmin()) == 0


# ------------------------------------------------------------------ build_loss
def test_combined_loss_weights_parts_and_parameters(batch):
    inputs = inputs_of(batch)
    torch.manual_seed(0)
    combined = build_loss({"infonce": 2.0, "proxy_anchor": 0.5, "triplet": 0}, {"triplet": {"margin": 0.1}}, D, C)
    total, parts = combined(inputs)
    assert set(parts) == {"infonce", "proxy_anchor"}
    assert float(total.detach()) == pytest.approx(2.0 * parts["infonce"] + 0.5 * parts["proxy_anchor"], rel=1e-6)
    assert [n for n, _ in combined.named_parameters()] == ["losses.proxy_anchor.proxies"]
    assert combined.requires == frozenset({"labels"})
    without_labels = LossInputs(inputs.image, inputs.text, inputs.logit_scale, inputs.item)
    with pytest.raises(ValueError, match="labels"):
        combined(without_labels)


@pytest.mark.parametrize("weights, options, num_classes, message", [
    ({}, {}, C, "empty"),
    ({"infonce": 0.0, "ce": 0}, {}, C, "every weight is zero"),
    ({"infonce": -1.0}, {}, C, "infonce: weight"),
    ({"infonse": 1.0}, {}, C, "did you mean 'infonce'"),
    ({"triplet": 1.0}, {"triplet": {"margn": 0.1}}, C, "unknown option 'margn' for loss 'triplet'.*'margin'"),
    ({"triplet": 1.0}, {"triplet": {"margin": -0.1}}, C, "'triplet': option 'margin' must be >= 0"),
    ({"triplet": 1.0}, {"infonce": {}}, C, "not in losses"),
    ({"ce": 1.0}, {}, 0, "ce: needs labels.*num_classes == 0"),
    ({"id": 1.0}, {}, 0, "id: needs identity"),
    ({"triplet": 1.0}, {"triplet": {"positives": "labels"}}, 0, "triplet: needs labels"),
])
def test_build_loss_errors(weights, options, num_classes, message):
    with pytest.raises(ConfigError, match=message):
        build_loss(weights, options, D, num_classes)


def test_ncl_is_exactly_symmetric_before_sinkhorn_converges(batch):
    # one Sinkhorn run per direction: swapping the modalities swaps the runs, converged or not
    swapped = inputs_of(batch, swap=True)
    for iterations in (1, 2):
        value = loss_value("ncl", inputs_of(batch), iterations=iterations)
        assert float(loss_value("ncl", swapped, iterations=iterations)) == pytest.approx(float(value), abs=1e-6)


# ------------------------------------------------------------------ real data
WIKIPEDIA = "/work/shared/datasets/wikipedia_cmr/wikipedia_cmr.npz"
#: the 2010 SIFT/LDA features are weak: the paper defaults (alpha 32, scale 9) barely move linear heads
REAL_DATA_OPTIONS = {"proxy_anchor": {"alpha": 4.0}, "proxy_nca": {"scale": 3.0}}


@pytest.fixture(scope="module")
def wikipedia():
    np = pytest.importorskip("numpy")
    try:
        z = np.load(WIKIPEDIA)
    except FileNotFoundError:
        pytest.skip(f"{WIKIPEDIA} not available")

    def standardise(x):
        x = torch.tensor(x, dtype=torch.float32)
        return (x - x.mean(0)) / (x.std(0) + 1e-6)

    return {split: (standardise(z[f"{split}_image"]), standardise(z[f"{split}_text"]),
                    torch.tensor(z[f"{split}_label"])) for split in ("train", "test")}


def _class_precision_at_10(image, text, label):
    """Mean over both directions of the fraction of the top-10 neighbours sharing the query's class."""
    def one_way(q, g):
        return (label[(q @ g.t()).topk(10, dim=1).indices] == label[:, None]).float().mean()
    return float(one_way(image, text) + one_way(text, image)) / 2


@pytest.mark.slow  # ~0.2-0.5 s per loss unloaded, 4-8 s for all 15
@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_learns_linear_heads_on_wikipedia_features(name, wikipedia):
    """100 Adam steps of two linear heads (128-d SIFT-BoW, 10-d LDA -> 32) with the loss alone
    (centre loss beside InfoNCE: alone it collapses by design). Class labels double as
    identities for the person-search losses. Chance precision@10 on the test split is 0.11."""
    torch.manual_seed(0)
    (image, text, label), test = wikipedia["train"], wikipedia["test"]
    heads = torch.nn.ModuleList([torch.nn.Linear(128, 32), torch.nn.Linear(10, 32)])
    log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    weights = {"infonce": 1.0, "center": 0.1} if name == "center" else {name: 1.0}
    combined = build_loss(weights, {name: REAL_DATA_OPTIONS.get(name, {})}, 32, 10)
    opt = torch.optim.Adam([*heads.parameters(), log_scale, *combined.parameters()], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for step in range(100):
        idx = torch.randint(0, len(label), (128,), generator=g)
        inputs = LossInputs(unit(heads[0](image[idx])), unit(heads[1](text[idx])), log_scale.exp(), idx,
                            F.one_hot(label[idx], 10).float(), label[idx])
        total, _ = combined(inputs)
        first = float(total.detach()) if step == 0 else first
        opt.zero_grad()
        total.backward()
        opt.step()
    with torch.no_grad():
        precision = _class_precision_at_10(unit(heads[0](test[0])), unit(heads[1](test[1])), test[2])
    assert float(total.detach()) < first
    assert precision > 0.14, precision
