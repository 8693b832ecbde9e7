"""Resumable training: a run stopped after epoch k and rerun ends at the same model, bit for bit,
as an uninterrupted run; a checkpoint of other settings is not used."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cmr.data.prepare import Prepared, prepare_dataset
from cmr.data.schema import by_split
from cmr.losses import build_loss
from cmr.models import build_two_tower
from cmr.training.engine import train_heads
from cmr.training.features import FeatureSet, compute_backbone_features, label_matrix
from cmr.training.resume import Resume

from conftest import DEFAULT_DATA, REPO


def _tiny_prepared() -> Prepared:
    """48 train + 16 val items of the embedded default, 0 test."""
    full = prepare_dataset("openclipart", str(DEFAULT_DATA), {}, 0.25, 0.0, 0)
    keep = by_split(full.items, "train")[:48] + by_split(full.items, "val")[:16]
    return Prepared(keep, full.root, None, full.label_set, full.info)


@pytest.fixture(scope="module")
def heads_setup():
    prepared = _tiny_prepared()
    torch.manual_seed(0)
    bundle = build_two_tower("lite0-minilm", embed_dim=32, head="mlp")
    bundle.model.lock_image_tower()
    bundle.model.lock_text_tower()
    feats = {}
    for split in ("train", "val"):
        items = by_split(prepared.items, split)
        img, txt, owner = compute_backbone_features(bundle.model, bundle.tokenizer, bundle.preprocess_val, items,
                                                    prepared.root, None, "cpu", batch_size=32)
        feats[split] = FeatureSet(img, txt, owner, label_matrix(items, prepared.label_set))
    return prepared, bundle.model, feats


class _Killed(Exception):
    pass


def _train(heads_setup, resume: Resume | None, stop_at: str | None = None):
    prepared, start_model, feats = heads_setup
    model = copy.deepcopy(start_model)
    torch.manual_seed(0)  # the classifier's initial weights
    # a loss with parameters of its own (the classifier), so its state must be restored too
    loss = build_loss({"infonce": 1.0, "ce": 0.5}, {}, model.embed_dim, len(prepared.label_set))
    lines: list[str] = []

    def log(m):
        lines.append(m)
        if stop_at and m.startswith(stop_at):
            raise _Killed(m)

    result = train_heads(model, loss, feats["train"], feats["val"], epochs=4, batch_size=16, lr=3e-3,
                         weight_decay=0.01, select_metric="val/rsum", seed=3, log=log, resume=resume)
    return model, loss, result, lines


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_stopped_after_epoch_2_resumes_to_the_uninterrupted_result(heads_setup, tmp_path):
    ref_model, ref_loss, ref, _ = _train(heads_setup, None)
    resume = Resume(tmp_path / "resume", "settings-a")
    with pytest.raises(_Killed):
        _train(heads_setup, resume, stop_at="epoch 2/4")
    assert json.loads((tmp_path / "resume" / "checkpoint.json").read_text())["epoch"] == 2
    model, loss, result, lines = _train(heads_setup, resume)
    assert any(m.startswith("resuming after epoch 2 of 4") for m in lines)
    assert not any(m.startswith(("epoch 0", "epoch 1/", "epoch 2/")) for m in lines)  # only epochs 3, 4 ran
    assert result.history == ref.history and result.best_epoch == ref.best_epoch and result.best == ref.best
    assert _same_state(model, ref_model) and _same_state(loss, ref_loss)


def test_a_checkpoint_of_other_settings_is_not_resumed(heads_setup, tmp_path):
    _, _, ref, _ = _train(heads_setup, None)
    with pytest.raises(_Killed):
        _train(heads_setup, Resume(tmp_path / "resume", "settings-a"), stop_at="epoch 2/4")
    _, _, result, lines = _train(heads_setup, Resume(tmp_path / "resume", "settings-b"))
    assert any("written with other settings or data: starting at epoch 1" in m for m in lines)
    assert result.history == ref.history


def test_an_unreadable_checkpoint_starts_afresh(heads_setup, tmp_path):
    (tmp_path / "resume").mkdir()
    (tmp_path / "resume" / "state.pt").write_bytes(b"not a checkpoint")
    _, _, result, lines = _train(heads_setup, Resume(tmp_path / "resume", "x"))
    assert any("is unreadable" in m for m in lines) and len(result.history) == 4


# ------------------------------------------------------------------ a real SIGKILL of a real process

_FIT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_resume import fit_tiny
def log(m):
    print(m, flush=True)
    if os.environ.get("KILL_AT") and m.startswith(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
fit_tiny({out!r}, {cache!r}, {resume!r}, log)
"""


def fit_tiny(out_dir: str, cache_dir: str, resume_dir: str | None, log) -> None:
    """The pretrain stage's code path (``fit``) on tiny data; run in a subprocess by the test."""
    from cmr.training.fit import fit

    fit(_tiny_prepared(), out_dir, arch="lite0-minilm", pretrained="offline", embed_dim=32, head="mlp",
        init_dir=None, lock_image=True, lock_text=True, losses={"infonce": 1.0}, loss_options={}, epochs=4,
        batch_size=16, lr=3e-3, weight_decay=0.01, select_metric="val/rsum", seed=1, device="cpu", amp=False,
        level="instance", ks=(1, 5), cache_dir=cache_dir, log=log, resume_dir=resume_dir)


def _run_fit(tmp_path: Path, out: str, resume: str | None, kill_at: str | None = None):
    code = _FIT.format(tests=str(REPO / "tests"), out=str(tmp_path / out), cache=str(tmp_path / "cache"),
                       resume=None if resume is None else str(tmp_path / resume))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "KILL_AT": kill_at or ""}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_fit_killed_with_sigkill_resumes_to_the_same_saved_model(tmp_path):
    ref = _run_fit(tmp_path, "ref", None)
    assert ref.returncode == 0, ref.stderr
    killed = _run_fit(tmp_path, "out", "resume", kill_at="epoch 3/4")
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists() and (tmp_path / "resume" / "state.pt").is_file()
    resumed = _run_fit(tmp_path, "out", "resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 3 of 4" in resumed.stdout and "epoch 1/4" not in resumed.stdout
    for name in ("model", "history.json", "metrics.json", "training.json"):
        for a in sorted((tmp_path / "ref" / name).rglob("*")) if (tmp_path / "ref" / name).is_dir() \
                else [tmp_path / "ref" / name]:
            b = tmp_path / "out" / a.relative_to(tmp_path / "ref")
            assert a.read_bytes() == b.read_bytes(), f"{b} differs from the uninterrupted run's"
    assert not (tmp_path / "resume").exists()  # removed once the model is saved


@pytest.mark.slow  # three runs that decode and augment images every step
def test_tower_training_resumes_to_the_uninterrupted_result(tmp_path):
    """The unlocked-tower path: random augmentation draws from the global RNG between steps."""
    from cmr.training.engine import train_towers

    prepared = _tiny_prepared()
    torch.manual_seed(0)
    bundle = build_two_tower("lite0-minilm", embed_dim=16)
    bundle.model.lock_text_tower()
    train, val = by_split(prepared.items, "train")[:12], by_split(prepared.items, "val")[:6]
    owner = torch.tensor([i for i, it in enumerate(train) for _ in it.texts])
    fs = FeatureSet(torch.zeros(len(train), 0), torch.zeros(len(owner), 0), owner)

    def run(resume, stop_at=None):
        model = copy.deepcopy(bundle.model)
        loss = build_loss({"infonce": 1.0}, {}, model.embed_dim, 0)

        def encode_val():
            img, txt, o = compute_backbone_features(model, bundle.tokenizer, bundle.preprocess_val, val,
                                                    prepared.root, None, "cpu", batch_size=8)
            with torch.no_grad():
                return FeatureSet(model.head_image(img), model.head_text(txt), o)

        def log(m):
            if stop_at and m.startswith(stop_at):
                raise _Killed(m)

        result = train_towers(model, loss, bundle.tokenizer, bundle.preprocess_train, encode_val, train,
                              prepared.root, fs, epochs=2, batch_size=6, lr=1e-3, weight_decay=0.0,
                              select_metric="val/rsum", seed=5, log=log, resume=resume, freeze_bn_stats=False)
        return model, result

    ref_model, ref = run(None)
    resume = Resume(tmp_path / "resume", "towers")
    with pytest.raises(_Killed):
        run(resume, stop_at="epoch 1/2")
    model, result = run(resume)
    assert result.history == ref.history and _same_state(model, ref_model)
