"""Compression: the int8 model stays close to the teacher and is smaller; the student starts from the teacher."""
from __future__ import annotations

import json

import pytest
import torch

from cmr.models.compress import (distill_text, encode_texts, items_per_second, quantize_int8, state_size_mb,
                                 truncate_text_layers)
from cmr.errors import ConfigError


@pytest.fixture(scope="module")
def titles(repo_root):
    rows = [json.loads(line) for line in (repo_root / "data/raw/openclipart_mini/items.jsonl").open()]
    return [r["title"] for r in rows if r.get("title")][:24]


def test_int8_is_smaller_and_encodes_close_to_the_teacher(lite0, titles):
    teacher = lite0.model.eval()
    q = quantize_int8(teacher)
    assert state_size_mb(q.clip.text) < 0.7 * state_size_mb(teacher.clip.text)
    assert state_size_mb(q) < state_size_mb(teacher)
    a, b = encode_texts(teacher, lite0.tokenizer, titles), encode_texts(q, lite0.tokenizer, titles)
    cos = (a * b).sum(-1)
    assert cos.mean() > 0.95 and cos.min() > 0.85
    assert not any(isinstance(m, torch.nn.Linear) and type(m) is torch.nn.Linear for m in q.modules())
    assert any(isinstance(m, torch.nn.Linear) for m in teacher.modules())  # the copy, not the teacher, changed


def test_student_keeps_the_chosen_teacher_layers(lite0, titles):
    teacher = lite0.model
    student = truncate_text_layers(teacher, [0, 5])
    layers_s = student.clip.text.transformer.encoder.layer
    layers_t = teacher.clip.text.transformer.encoder.layer
    assert len(layers_s) == 2 and len(layers_t) == 6
    for s, t in ((layers_s[0], layers_t[0]), (layers_s[1], layers_t[5])):
        for ps, pt in zip(s.parameters(), t.parameters()):
            assert torch.equal(ps, pt) and ps.data_ptr() != pt.data_ptr()
    assert student.clip.text.transformer.config.num_hidden_layers == 2
    # all layers kept = the teacher itself
    full = truncate_text_layers(teacher, list(range(6)))
    assert torch.allclose(encode_texts(full, lite0.tokenizer, titles[:4]),
                          encode_texts(teacher, lite0.tokenizer, titles[:4]), atol=1e-5)
    with pytest.raises(ConfigError):
        truncate_text_layers(teacher, [3, 1])


@pytest.mark.slow  # ~10 s on 2 idle cores: a backward pass through MiniLM
def test_distillation_moves_the_student_towards_the_teacher(lite0, titles):
    teacher = lite0.model
    student = truncate_text_layers(teacher, [0])
    texts = titles[:16]
    history = distill_text(student, teacher, lite0.tokenizer, texts, epochs=3, batch_size=8, lr=1e-3, seed=0,
                           log=lambda m: None)
    assert history[-1] < history[0]
    # the teacher is untouched and the image tower is shared unchanged
    img = torch.randn(2, teacher.backbone_image_dim)
    assert torch.equal(student.head_image(img), teacher.head_image(img))


def test_items_per_second_counts_items():
    seen = []
    rate = items_per_second(lambda b: seen.append(len(b)), list(range(10)), batch_size=4)
    assert seen == [4, 4, 4, 2] and rate > 0
