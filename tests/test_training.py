"""Training loops on real data: validation-only selection restores the best state; tower fine-tuning
updates exactly the unlocked tower."""
from __future__ import annotations

import json

import pytest
import torch

from cmr.data.prepare import prepare_dataset
from cmr.data.schema import by_split
from cmr.losses import build_loss
from cmr.models import build_two_tower
from cmr.training.engine import train_heads, train_towers, validate
from cmr.training.features import FeatureSet, compute_backbone_features, label_matrix

from conftest import DEFAULT_DATA


@pytest.fixture(scope="module")
def small():
    prepared = prepare_dataset("openclipart", str(DEFAULT_DATA), {}, 0.25, 0.0, 0)
    keep = [it for it in prepared.items if it.split == "train"][:48] + [it for it in prepared.items
                                                                       if it.split == "val"][:24]
    bundle = build_two_tower("lite0-minilm", embed_dim=32)
    feats = {}
    for split in ("train", "val"):
        items = by_split(keep, split)
        img, txt, owner = compute_backbone_features(bundle.model, bundle.tokenizer, bundle.preprocess_val, items,
                                                    prepared.root, None, "cpu", batch_size=24)
        feats[split] = FeatureSet(img, txt, owner, label_matrix(items, prepared.label_set))
    return prepared, keep, bundle, feats


def test_train_heads_restores_the_validation_best_state(small):
    prepared, _, bundle, feats = small
    model = bundle.model
    model.lock_image_tower()
    model.lock_text_tower()
    loss = build_loss({"infonce": 1.0}, {}, model.embed_dim, len(prepared.label_set))
    result = train_heads(model, loss, feats["train"], feats["val"], epochs=4, batch_size=16, lr=3e-3,
                         weight_decay=0.0, select_metric="val/rsum", seed=0, log=lambda m: None)
    assert len(result.history) == 4
    best_seen = max([h["val/rsum"] for h in result.history])
    assert result.best["rsum"] >= best_seen  # the starting state can only win if no epoch beat it
    # the model left behind is the selected one, scored on validation exactly as during training
    assert validate(model, feats["val"], "cpu", "instance", (1, 5, 10))["rsum"] == pytest.approx(result.best["rsum"])
    assert result.best["rsum"] > 0


def test_an_unknown_select_metric_is_a_config_error_before_training(small):
    from cmr.errors import ConfigError

    prepared, _, bundle, feats = small
    loss = build_loss({"infonce": 1.0}, {}, bundle.model.embed_dim, len(prepared.label_set))
    with pytest.raises(ConfigError, match=r"select_metric 'val/bogus' is not a validation metric; have .*val/rsum"):
        train_heads(bundle.model, loss, feats["train"], feats["val"], epochs=1, batch_size=16, lr=3e-3,
                    weight_decay=0.0, select_metric="val/bogus", seed=0, log=lambda m: None)
    with pytest.raises(ConfigError, match=r"select_metric 'val/t2i/MnR': lower is better"):
        train_heads(bundle.model, loss, feats["train"], feats["val"], epochs=1, batch_size=16, lr=3e-3,
                    weight_decay=0.0, select_metric="val/t2i/MnR", seed=0, log=lambda m: None)


def test_continuing_a_checkpoint_with_other_model_settings_is_refused(small, tmp_path):
    from cmr.errors import ConfigError
    from cmr.models import save_two_tower
    from cmr.training.fit import fit

    prepared, _, bundle, _ = small
    save_two_tower(bundle.model, bundle.spec, tmp_path / "pre" / "model")
    spec = bundle.spec
    settings = dict(arch=spec.arch, pretrained=spec.pretrained, embed_dim=spec.embed_dim, head=spec.head)
    for key, other in (("arch", "bogus"), ("embed_dim", spec.embed_dim * 2), ("head", "identity")):
        with pytest.raises(ConfigError, match=rf"trained with other model settings: model\.{key} {other!r}"):
            fit(prepared, str(tmp_path / "out"), **(settings | {key: other}), init_dir=str(tmp_path / "pre"),
                lock_image=True, lock_text=True, losses={"infonce": 1.0}, loss_options={}, epochs=1, batch_size=16,
                lr=1e-3, weight_decay=0.0, select_metric="val/rsum", seed=0, device="cpu", amp=False,
                level="instance", ks=(1,), cache_dir=None, log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_train_towers_updates_only_the_unlocked_tower(small):
    prepared, keep, _, _ = small
    bundle = build_two_tower("lite0-minilm", embed_dim=32)
    model = bundle.model
    model.lock_text_tower()
    before_img = [p.detach().clone() for p in model.image_tower_parameters()]
    before_txt = [p.detach().clone() for p in model.text_tower_parameters()]
    train = by_split(keep, "train")[:16]
    owner = torch.tensor([i for i, it in enumerate(train) for _ in it.texts])
    fs = FeatureSet(torch.zeros(len(train), 1), torch.zeros(len(owner), 1), owner)
    loss = build_loss({"infonce": 1.0}, {}, model.embed_dim, 0)
    val = by_split(keep, "val")[:8]

    def encode_val():
        img, txt, o = compute_backbone_features(model, bundle.tokenizer, bundle.preprocess_val, val, prepared.root,
                                                None, "cpu", batch_size=8)
        with torch.no_grad():
            return FeatureSet(model.head_image(img), model.head_text(txt), o)

    result = train_towers(model, loss, bundle.tokenizer, bundle.preprocess_train, encode_val, train, prepared.root,
                          fs, epochs=1, batch_size=8, lr=1e-3, weight_decay=0.0, select_metric="val/rsum", seed=0,
                          log=lambda m: None)
    assert torch.isfinite(torch.tensor(result.history[0]["train/loss"]))
    # if epoch 1 won, the image tower moved; the locked text tower never moves
    moved = any(not torch.equal(a, b) for a, b in zip(before_img, model.image_tower_parameters()))
    assert moved == (result.best_epoch == 1)
    assert all(torch.equal(a, b) for a, b in zip(before_txt, model.text_tower_parameters()))


def test_image_batches_with_worker_processes_match_in_process_decoding():
    from cmr.models.backbones import image_transform
    from cmr.models.two_tower import TowerSpec
    from cmr.training.features import image_batches

    prepared = prepare_dataset("openclipart", str(DEFAULT_DATA), {}, 0.1, 0.15, 0)
    rels = [it.image for it in prepared.items[:10]]
    batches = [rels[:4], rels[4:7], rels[7:]]
    spec = TowerSpec(arch="x", pretrained="none", embed_dim=8, head="linear", image_dim=1, text_dim=1,
                     image_size=(64, 64), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic",
                     resize_mode="shortest", context_length=8, normalize_text_backbone=False)
    evaluate, train = image_transform(spec, is_train=False), image_transform(spec, is_train=True)
    inline = list(image_batches(prepared.root, batches, evaluate, workers=0))
    pooled = list(image_batches(prepared.root, batches, evaluate, workers=2))
    assert [b.shape[0] for b in pooled] == [4, 3, 3]  # in order, one tensor per batch
    assert all(torch.equal(a, b) for a, b in zip(inline, pooled))
    # random augmentation in workers: the same seed gives the same draws, another seed others
    first = list(image_batches(prepared.root, batches, train, workers=2, seed=7))
    again = list(image_batches(prepared.root, batches, train, workers=2, seed=7))
    other = list(image_batches(prepared.root, batches, train, workers=2, seed=8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_optimizer_gives_unlocked_towers_their_own_learning_rate():
    from cmr.training.engine import _optimizer

    model = build_two_tower("lite0-minilm", pretrained="none", embed_dim=32).model
    model.lock_text_tower()
    loss = build_loss({"ce": 1.0}, {}, model.embed_dim, 5)  # a loss with its own parameters (the classifier)
    opt = _optimizer(model, loss, lr=1e-3, weight_decay=0.1, backbone_lr=1e-5)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    trainable = [p for p in list(model.parameters()) + list(loss.parameters()) if p.requires_grad]
    assert set(lr_of) == {id(p) for p in trainable}  # every trainable parameter once, nothing frozen
    assert all(lr_of[id(p)] == 1e-5 for p in model.image_tower_parameters())
    assert not any(id(p) in lr_of for p in model.text_tower_parameters())
    assert all(lr_of[id(p)] == 1e-3 for p in list(model.image_head.parameters()) + list(loss.parameters()))
    assert lr_of[id(model.logit_scale)] == 1e-3 and decay_of[id(model.logit_scale)] == 0.0
    assert all(decay_of[id(p)] == (0.1 if p.ndim >= 2 else 0.0) for p in trainable)
    # backbone_lr null: one learning rate for everything (also what heads on cached features get)
    same = _optimizer(model, loss, lr=1e-3, weight_decay=0.1)
    assert {g["lr"] for g in same.param_groups} == {1e-3}
    assert sum(len(g["params"]) for g in same.param_groups) == len(trainable)


def test_unfreeze_top_trains_only_the_top_text_layer_on_cached_image_features(small, tmp_path, monkeypatch):
    """fit(unfreeze={'text': 1}): the last MiniLM layer (and nothing below it, nor the image tower)
    moves; the image side comes from the cache, so no image is decoded during training."""
    from cmr.models import load_two_tower
    from cmr.training import engine
    from cmr.training.fit import fit

    prepared, keep, _, _ = small
    sub = type(prepared)(**{**prepared.__dict__, "items": keep})
    start = build_two_tower("lite0-minilm", embed_dim=32).model
    decoded = []
    real_batches = engine.image_batches
    monkeypatch.setattr(engine, "image_batches", lambda *a, **k: decoded.append(1) or real_batches(*a, **k))
    fit(sub, str(tmp_path / "out"), arch="lite0-minilm", pretrained="offline", embed_dim=32, head="linear",
        init_dir=None, lock_image=True, lock_text=True, losses={"infonce": 1.0}, loss_options={}, epochs=1,
        batch_size=16, lr=1e-2, backbone_lr=1e-2, weight_decay=0.0, select_metric="val/rsum", seed=0,
        device="cpu", amp=False, level="instance", ks=(1, 5, 10), cache_dir=str(tmp_path / "cache"),
        log=lambda m: None, unfreeze={"text": 1})
    assert decoded == []
    info = json.loads((tmp_path / "out" / "training.json").read_text())
    assert info["backbone_tuned"] is True  # the tuned text side must never come from the pretrained cache
    tuned = load_two_tower(tmp_path / "out" / "model").model
    layers = lambda m: m.clip.text.transformer.encoder.layer
    top_moved = not all(torch.equal(a, b) for a, b in zip(layers(start)[-1].parameters(), layers(tuned)[-1].parameters()))
    assert top_moved == (info["best_epoch"] == 1)  # epoch 0 (the start) may win validation
    for lower_a, lower_b in zip(layers(start)[:-1], layers(tuned)[:-1]):
        assert all(torch.equal(a, b) for a, b in zip(lower_a.parameters(), lower_b.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(start.image_tower_parameters(), tuned.image_tower_parameters()))
    assert info["tuned_towers"] == ["text"] and info["base_backbone_id"] == "lite0-minilm|offline"
    # encode: the image side from the pretrained cache entry, the tuned text tower run afresh
    bundle = load_two_tower(tmp_path / "out" / "model")
    from cmr.training.fit import model_features, split_features

    got = model_features(bundle, sub, "val", tmp_path / "out", "cpu", str(tmp_path / "cache"))
    cached = split_features(bundle, sub, "val", "lite0-minilm|offline", "cpu", str(tmp_path / "cache"))
    fresh = split_features(bundle, sub, "val", "fresh", "cpu", None)
    assert torch.equal(got.image, cached.image)
    assert torch.allclose(got.text, fresh.text, atol=1e-5)
    assert torch.allclose(got.image, fresh.image, atol=1e-4)  # the cache held the same frozen tower's output


def test_unfreeze_asks_for_blocks_the_tower_has():
    from cmr.errors import ConfigError

    model = build_two_tower("lite0-minilm", embed_dim=8).model
    model.lock_image_tower()
    model.lock_text_tower()
    with pytest.raises(ConfigError, match=r"unfreeze.text: 7 top blocks asked, the text tower of this arch has 6"):
        model.unfreeze_top("text", 7)
    assert model.tower_frozen("image") and model.tower_frozen("text")
    model.unfreeze_top("image", 2)  # the last two MBConv blocks + conv_head/bn2
    trunk = model.clip.visual.trunk
    assert all(p.requires_grad for p in trunk.conv_head.parameters())
    assert all(p.requires_grad for p in trunk.blocks[-1].parameters())  # Lite0's last stage is one block
    assert all(p.requires_grad for p in trunk.blocks[-2][-1].parameters())
    assert not any(p.requires_grad for p in trunk.blocks[-2][-2].parameters())
    assert not any(p.requires_grad for p in trunk.conv_stem.parameters())
    assert not model.tower_frozen("image") and model.tower_frozen("text")
