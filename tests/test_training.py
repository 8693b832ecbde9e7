"""Training loops on real data: validation-only selection restores the best state; tower fine-tuning
updates exactly the unlocked tower."""
from __future__ import annotations

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
