"""Augmentation pool: each operation does what it is defined to do, seeded runs repeat exactly."""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

from cmr.data.augment import (AUGMENTATIONS, IMAGE_POOL, TEXT_POOL, build_image_augment, build_text_augment)
from cmr.errors import ConfigError


@pytest.fixture(scope="module")
def person(shared_datasets) -> Image.Image:
    with Image.open(shared_datasets / "cuhk_pedes_sample/images/CUHK01/0005001.png") as im:
        return im.convert("RGB")  # 60x160 pedestrian


TO_TENSOR = T.ToTensor()  # a preprocess without normalisation: values stay in [0, 1]


def test_pools_cover_the_tbps_operations():
    assert set(IMAGE_POOL) == {"random_resized_crop", "color_jitter", "rotation", "grayscale",
                               "horizontal_flip", "random_erasing"}
    assert set(TEXT_POOL) == {"random_deletion", "random_swap", "random_insertion"}


@pytest.mark.parametrize("name", IMAGE_POOL)
def test_each_image_op_keeps_shape_and_range_and_is_seeded(person, name):
    a = build_image_augment([name], TO_TENSOR, k=1, seed=3)
    b = build_image_augment([name], TO_TENSOR, k=1, seed=3)
    xs = [a(person) for _ in range(3)]
    ys = [b(person) for _ in range(3)]
    for x, y in zip(xs, ys):
        assert x.shape == (3, 160, 60)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert torch.equal(x, y)
    assert not torch.equal(xs[0], TO_TENSOR(person))  # the operation changed the image


def test_flip_is_the_mirror_image(person):
    x = build_image_augment(["horizontal_flip"], TO_TENSOR, k=1, seed=0)(person)
    assert torch.equal(x, TO_TENSOR(ImageOps.mirror(person)))


def test_grayscale_has_equal_channels(person):
    x = build_image_augment(["grayscale"], TO_TENSOR, k=1, seed=0)(person)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def test_erasing_zeroes_one_rectangle_and_keeps_the_rest(person):
    ref = TO_TENSOR(person)
    x = build_image_augment(["random_erasing"], TO_TENSOR, k=1, seed=0)(person)
    changed = (x != ref).any(dim=0)
    rows, cols = changed.nonzero(as_tuple=True)
    box = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
    assert (x[:, box[0], box[1]] == 0).all()  # the erased box is filled with 0
    outside = torch.ones_like(changed)
    outside[box] = False
    assert torch.equal(x[:, outside], ref[:, outside])
    area = changed.sum() / changed.numel()
    assert 0.0 < area <= 0.34  # scale (0.02, 0.33) of the image, up to rounding


def test_pool_applies_k_ops_and_global_rng_does_not_matter(person):
    aug = build_image_augment(["grayscale", "horizontal_flip"], TO_TENSOR, k=2, seed=1)
    torch.manual_seed(123)
    x = aug(person)
    assert torch.equal(x, TO_TENSOR(ImageOps.mirror(T.Grayscale(3)(person))))
    a = build_image_augment(list(IMAGE_POOL), TO_TENSOR, k=2, seed=5)
    b = build_image_augment(list(IMAGE_POOL), TO_TENSOR, k=2, seed=5)
    torch.manual_seed(0)
    xa = a(person)
    torch.manual_seed(999)
    assert torch.equal(xa, b(person))


def test_k_zero_is_the_plain_preprocess(person):
    assert torch.equal(build_image_augment(list(IMAGE_POOL), TO_TENSOR, k=0, seed=0)(person), TO_TENSOR(person))


CAPTION = "a woman in a red coat carries a black bag"


def test_deletion_keeps_a_subsequence_and_never_empties():
    aug = build_text_augment(["random_deletion"], p=0.3, seed=0)
    words = CAPTION.split()
    for _ in range(20):
        out = aug(CAPTION).split()
        it = iter(words)
        assert all(w in it for w in out)  # order kept, words only removed
        assert 1 <= len(out) <= len(words)
    assert build_text_augment(["random_deletion"], p=1.0, seed=0)(CAPTION) in words


def test_swap_is_a_permutation_and_two_words_reverse():
    aug = build_text_augment(["random_swap"], p=0.2, seed=0)
    out = aug(CAPTION)
    assert Counter(out.split()) == Counter(CAPTION.split()) and out != CAPTION
    assert build_text_augment(["random_swap"], p=0.5, seed=0)("red coat") == "coat red"


def test_insertion_adds_words_from_the_sentence():
    aug = build_text_augment(["random_insertion"], p=0.2, seed=0)
    words = CAPTION.split()
    out = aug(CAPTION).split()
    added = Counter(out) - Counter(words)
    assert len(out) == len(words) + round(0.2 * len(words))
    assert sum(added.values()) == len(out) - len(words) and set(added) <= set(words)
    assert not (Counter(words) - Counter(out))  # nothing removed


def test_text_augment_is_seeded():
    a = build_text_augment(list(TEXT_POOL), p=0.2, seed=7)
    b = build_text_augment(list(TEXT_POOL), p=0.2, seed=7)
    random.seed(1)
    outs = [a(CAPTION) for _ in range(5)]
    random.seed(2)
    assert outs == [b(CAPTION) for _ in range(5)]
    assert len(set(outs)) > 1


def test_bad_names_and_settings_are_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'grayscale'"):
        build_image_augment(["greyscale"], TO_TENSOR, k=1, seed=0)
    with pytest.raises(ConfigError, match="text operation"):
        build_image_augment(["random_swap"], TO_TENSOR, k=1, seed=0)
    with pytest.raises(ConfigError, match="k=3"):
        build_image_augment(["grayscale", "rotation"], TO_TENSOR, k=3, seed=0)
    with pytest.raises(ConfigError, match="p=0"):
        build_text_augment(["random_swap"], p=0, seed=0)
    assert "rotation" in AUGMENTATIONS
