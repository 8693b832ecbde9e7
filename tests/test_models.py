"""Two-tower backbones: the pretrained towers compute what their references compute, on real data."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cmr.errors import ConfigError
from cmr.models import HEADS, build_two_tower, list_architectures, load_two_tower, save_two_tower
from cmr.models.heads import build_head
from cmr.models.offline_weights import (lite0_imagenet_classifier, lite0_weights_file, lite_imagenet_classifier,
                                        lite_weights_file, minilm_dir)

PHOTOS = Path("/work/shared/datasets/gcompris/images/explore_farm_animals")
CAT = PHOTOS / "cat_photo.jpg"
# ImageNet-1k: 281 tabby, 282 tiger cat, 283 Persian, 284 Siamese, 285 Egyptian cat.
CAT_CLASSES = {281, 282, 283, 284, 285}
# Logits of the weights package's own model (efficientnet_lite_pytorch 0.1.0,
# EfficientNet.from_pretrained('efficientnet-lite0', weights_path=<the packaged .pth>)) on CAT
# after this bundle's preprocess_val: its top-5 classes and their logits.
REFERENCE_TOP5 = [285, 284, 281, 151, 361]
REFERENCE_TOP5_LOGITS = [6.5242, 5.7712, 5.7263, 5.5143, 5.1257]
SENTENCES = [
    "a cat sleeping on a sofa",
    "a kitten napping on the couch in the afternoon sun",
    "the quarterly tax report is due on Monday",
    "A red bicycle leans against an old brick wall, next to a bakery that sells fresh bread every morning.",
]


@pytest.fixture(scope="module")
def cat_pixels(lite0):
    return lite0.preprocess_val(Image.open(CAT).convert("RGB"))[None]


# -- image tower -------------------------------------------------------------------------------

def test_image_tower_reproduces_reference_model_on_cat_photo(lite0, cat_pixels):
    classifier = lite0_imagenet_classifier()
    with torch.no_grad():
        logits = classifier(cat_pixels)[0]
        pooled = classifier.forward_head(classifier.forward_features(cat_pixels), pre_logits=True)
        backbone = lite0.model.eval().backbone_image(cat_pixels)
    top5 = logits.topk(5).indices.tolist()
    assert top5[0] in CAT_CLASSES and top5 == REFERENCE_TOP5
    torch.testing.assert_close(logits[REFERENCE_TOP5], torch.tensor(REFERENCE_TOP5_LOGITS), atol=2e-3, rtol=0)
    # The two-tower image backbone is that classifier's pooled 1280-d feature, nothing else.
    torch.testing.assert_close(backbone, pooled, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None,
                    reason="the package's reference model needs `pip install efficientnet_lite_pytorch`")
def test_image_tower_equals_package_reference_model(lite0):
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(lite0_weights_file())).eval()
    photos = torch.stack([lite0.preprocess_val(Image.open(p).convert("RGB")) for p in sorted(PHOTOS.glob("*_photo.jpg"))])
    with torch.no_grad():
        torch.testing.assert_close(lite0_imagenet_classifier()(photos), reference(photos), atol=1e-4, rtol=1e-4)


# ImageNet-1k classes a farm photo may rightly get: 7 cock, 8 hen; 345 ox, 346 water buffalo, 347 bison;
# 348 ram, 349 bighorn
FARM_CLASSES = {"cat_photo.jpg": CAT_CLASSES, "chicken_photo.jpg": {7, 8}, "cow_photo.jpg": {345, 346, 347},
                "sheep_photo.jpg": {348, 349}}


@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_stronger_lite_towers_know_farm_photos(variant):
    """Lite1/Lite2 (240 / 260 px): the loaded classifier names the animals, equals the weights
    package's own model, and the two-tower image backbone is its pooled feature."""
    bundle = build_two_tower(f"{variant}-minilm", embed_dim=8)
    assert bundle.spec.image_size == {"lite1": (240, 240), "lite2": (260, 260)}[variant]
    photos = torch.stack([bundle.preprocess_val(Image.open(PHOTOS / name).convert("RGB")) for name in FARM_CLASSES])
    classifier = lite_imagenet_classifier(variant)
    with torch.no_grad():
        logits = classifier(photos)
        pooled = classifier.forward_head(classifier.forward_features(photos), pre_logits=True)
        backbone = bundle.model.eval().backbone_image(photos)
    for name, top1 in zip(FARM_CLASSES, logits.argmax(1).tolist()):
        assert top1 in FARM_CLASSES[name], (variant, name, top1)
    torch.testing.assert_close(backbone, pooled, atol=1e-4, rtol=1e-4)
    if importlib.util.find_spec("efficientnet_lite_pytorch") is not None:
        from efficientnet_lite_pytorch import EfficientNet

        reference = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=str(lite_weights_file(variant)))
        with torch.no_grad():
            torch.testing.assert_close(logits, reference.eval()(photos), atol=1e-4, rtol=1e-4)


def test_concatenated_towers_are_each_trunk_at_its_own_size(tmp_path):
    """lite0+lite2-minilm: pixels at Lite2's 260 px; the pooled features of Lite0 (on the pixels resized
    to its 224 px, bicubic, antialiased) and of Lite2, side by side in the arch's order; Lite0 still
    names the animals from the resized pixels; save/load keeps it; a top-block unfreeze is refused."""
    bundle = build_two_tower("lite0+lite2-minilm", embed_dim=8)
    assert bundle.spec.image_size == (260, 260) and bundle.spec.image_dim == 2 * 1280
    photos = torch.stack([bundle.preprocess_val(Image.open(PHOTOS / name).convert("RGB")) for name in FARM_CLASSES])
    small = F.interpolate(photos, size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
    lite0, lite2 = lite_imagenet_classifier("lite0"), lite_imagenet_classifier("lite2")
    with torch.no_grad():
        expected = torch.cat([lite0.forward_head(lite0.forward_features(small), pre_logits=True),
                              lite2.forward_head(lite2.forward_features(photos), pre_logits=True)], 1)
        backbone = bundle.model.eval().backbone_image(photos)
        top1 = lite0(small).argmax(1).tolist()
    torch.testing.assert_close(backbone, expected, atol=1e-4, rtol=1e-4)
    assert all(t in FARM_CLASSES[name] for name, t in zip(FARM_CLASSES, top1)), top1
    save_two_tower(bundle.model, bundle.spec, tmp_path / "model")
    loaded = load_two_tower(tmp_path / "model")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval().backbone_image(photos), backbone, atol=0, rtol=0)
    loaded.model.lock_image_tower()
    with pytest.raises(ConfigError, match="unfreeze.image: this arch's image tower has no known block layout"):
        loaded.model.unfreeze_top("image", 2)


def test_channels_last_gives_identical_image_features(lite0, cat_pixels):
    model = lite0.model.eval()
    with torch.no_grad():
        fast = model.backbone_image(cat_pixels)
        model.channels_last = False
        try:
            plain = model.backbone_image(cat_pixels.contiguous())
        finally:
            model.channels_last = True
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)


# -- text tower --------------------------------------------------------------------------------

def test_text_tower_equals_hand_written_mean_pooling(lite0):
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_dir()
    tok, bert = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = []
        for s in SENTENCES:  # one at a time: no padding at all in the reference
            hidden = bert(**tok(s, return_tensors="pt")).last_hidden_state[0]
            expected.append(F.normalize(hidden.mean(0), dim=0))
        got = lite0.model.eval().backbone_text(lite0.tokenizer(SENTENCES))
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=1e-4)


def test_similar_sentences_score_higher(lite0):
    with torch.no_grad():
        e = lite0.model.eval().backbone_text(lite0.tokenizer(SENTENCES))
    sim = e @ e.T  # cosine: the rows are unit vectors
    unrelated = sim[[0, 0, 1, 1], [2, 3, 2, 3]]
    assert sim[0, 1] > 0.5 and unrelated.max() < 0.2


@pytest.mark.slow
def test_text_tower_equals_sentence_transformers(lite0):
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(minilm_dir()), device="cpu")
    expected = reference.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True)
    with torch.no_grad():
        got = lite0.model.eval().backbone_text(lite0.tokenizer(SENTENCES))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


# -- the two-tower model -----------------------------------------------------------------------

def test_encode_shapes_and_unit_norms(lite0, cat_pixels):
    model = lite0.model.eval()
    assert (model.backbone_image_dim, model.backbone_text_dim, model.embed_dim) == (1280, 384, 64)
    with torch.no_grad():
        img = model.encode_image(cat_pixels.repeat(2, 1, 1, 1))
        txt = model.encode_text(lite0.tokenizer(SENTENCES))
        torch.testing.assert_close(img, model.head_image(model.backbone_image(cat_pixels.repeat(2, 1, 1, 1))))
    assert img.shape == (2, 64) and txt.shape == (len(SENTENCES), 64)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(len(SENTENCES)))
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07)


@pytest.mark.parametrize("kind", HEADS.names())
def test_every_head_maps_to_embed_dim(kind):
    in_dim, embed_dim = (32, 32) if kind == "identity" else (48, 16)
    head = build_head(kind, in_dim, embed_dim)
    x = torch.randn(5, in_dim, requires_grad=True)
    out = head(x)
    assert out.shape == (5, embed_dim) and torch.isfinite(out).all()
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_identity_head_with_wrong_width_is_a_config_error():
    with pytest.raises(ConfigError, match="identity.*1280"):
        build_two_tower("lite0-minilm", pretrained="none", head="identity", embed_dim=256)


def test_lock_freezes_exactly_the_backbones(lite0, cat_pixels):
    model = build_two_tower("lite0-minilm", pretrained="none", embed_dim=8).model
    image_ids = {id(p) for p in model.clip.visual.parameters()}
    text_ids = {id(p) for p in model.clip.text.parameters()}
    head_ids = {id(p) for p in [*model.image_head.parameters(), *model.text_head.parameters(), model.logit_scale]}
    assert image_ids | text_ids | head_ids == {id(p) for p in model.parameters()}

    model.lock_image_tower()
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert frozen == image_ids
    model.lock_text_tower()
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert frozen == image_ids | text_ids

    # Training mode leaves the locked towers in eval: BatchNorm statistics do not move.
    model.train()
    assert model.image_head.training and not model.clip.visual.training and not model.clip.text.training
    bn = model.clip.visual.trunk.bn1
    before = bn.running_mean.clone()
    model.encode_image(cat_pixels.repeat(2, 1, 1, 1)).sum().backward()
    torch.testing.assert_close(bn.running_mean, before, atol=0, rtol=0)
    assert model.image_head.weight.grad is not None


def test_frozen_norm_stats_keep_batchnorm_still_while_the_unlocked_tower_trains(cat_pixels):
    model = build_two_tower("lite0-minilm", pretrained="none", embed_dim=8).model
    model.freeze_norm_stats()
    model.train()
    bns = [m for m in model.clip.visual.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    assert model.clip.visual.trunk.training and model.clip.text.training  # dropout etc. still train
    bn = model.clip.visual.trunk.bn1
    before = bn.running_mean.clone()
    model.encode_image(cat_pixels.repeat(2, 1, 1, 1)).sum().backward()
    torch.testing.assert_close(bn.running_mean, before, atol=0, rtol=0)
    assert bn.weight.grad is not None  # scale and shift still learn
    model.freeze_norm_stats(False)
    model.encode_image(cat_pixels.repeat(2, 1, 1, 1))
    assert not torch.equal(bn.running_mean, before)


def test_save_load_round_trip_gives_identical_embeddings(lite0, cat_pixels, tmp_path):
    trained = copy.deepcopy(lite0.model)
    with torch.no_grad():
        trained.image_head.weight.mul_(3.0)  # a change that only a saved head carries
        trained.logit_scale.fill_(3.0)
    save_two_tower(trained, lite0.spec, tmp_path / "model")
    torch.manual_seed(123)
    loaded = load_two_tower(tmp_path / "model")
    assert loaded.spec == lite0.spec
    with torch.no_grad():
        a, b = trained.eval(), loaded.model.eval()
        tokens = lite0.tokenizer(SENTENCES)
        torch.testing.assert_close(b.encode_image(cat_pixels), a.encode_image(cat_pixels), atol=0, rtol=0)
        torch.testing.assert_close(b.encode_text(tokens), a.encode_text(tokens), atol=0, rtol=0)
    assert b.logit_scale.item() == 3.0
    torch.testing.assert_close(loaded.preprocess_val(Image.open(CAT).convert("RGB"))[None], cat_pixels)


# -- names and weight sources ------------------------------------------------------------------

def test_registry_read_without_open_clip_lists_what_open_clip_lists():
    import open_clip

    from cmr.models.architectures import CONFIG_DIR, OPENCLIP_PREFIX

    own = {p.stem for p in CONFIG_DIR.glob("*.json")}
    registered = {n for n in list_architectures() if n.startswith(OPENCLIP_PREFIX)}
    assert registered == {OPENCLIP_PREFIX + n for n in open_clip.list_models() if n not in own}
    assert {"lite0-minilm", "lite1-minilm", "lite2-minilm"} <= set(open_clip.list_models())  # cmr's configs added


def test_unknown_arch_names_the_nearest_valid_one():
    assert "lite0-minilm" in list_architectures() and "openclip:ViT-B-32" in list_architectures()
    with pytest.raises(ConfigError, match="did you mean 'lite0-minilm'"):
        build_two_tower("lite0-minlm")
    with pytest.raises(ConfigError, match="did you mean 'ViT-B-32"):
        build_two_tower("ViT-B-23")


def test_openclip_tag_fails_fast_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="'openai'.*ViT-B-32"):
        build_two_tower("ViT-B-32", pretrained="openai")
    with pytest.raises(ConfigError, match="no weights installed offline"):
        build_two_tower("ViT-B-32", pretrained="offline")


class _Payload:
    """Unpickling this runs code: what a weights_only load must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pt_checkpoint_is_loaded_weights_only(tmp_path):
    import open_clip

    torch.manual_seed(0)
    source = open_clip.create_model("ViT-S-32-alt").state_dict()
    good = tmp_path / "clip.pt"
    torch.save({"state_dict": source}, good)
    loaded = build_two_tower("openclip:ViT-S-32-alt", pretrained=str(good), embed_dim=256, head="identity")
    assert loaded.spec.image_dim == 256 and loaded.spec.arch == "openclip:ViT-S-32-alt"
    for (name, p), q in zip(source.items(), loaded.model.clip.state_dict().values()):
        torch.testing.assert_close(q, p, atol=0, rtol=0, msg=name)
    # A standard CLIP keeps its text transformer on the model itself; locking still finds it.
    clip = loaded.model.clip
    loaded.model.lock_text_tower()
    frozen = {n for n, p in clip.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in clip.named_parameters() if not n.startswith(("visual.", "logit_scale"))}
    assert "token_embedding.weight" in frozen and "text_projection" in frozen

    marker, evil = tmp_path / "code-ran", tmp_path / "evil.pt"
    torch.save({"state_dict": {"logit_scale": torch.zeros(())}, "extra": _Payload(marker)}, evil)
    with pytest.raises(ConfigError, match="refused"):
        build_two_tower("ViT-S-32-alt", pretrained=str(evil), embed_dim=256, head="identity")
    assert not marker.exists()


def test_legacy_format_pickle_is_refused_too(tmp_path):
    marker, evil = tmp_path / "code-ran", tmp_path / "evil.bin"
    torch.save({"extra": _Payload(marker)}, evil, _use_new_zipfile_serialization=False)
    with pytest.raises(ConfigError, match="refused"):
        build_two_tower("ViT-S-32-alt", pretrained=str(evil), embed_dim=256, head="identity")
    assert not marker.exists()
