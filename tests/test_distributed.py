"""Data-parallel training (cmr.training.distributed) on CPU with gloo: two torchrun processes take the
same steps as one process on the same global batch, end at the same validation score, and a rank that
crashes fails the run without touching the output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddp_worker
from cmr.errors import ConfigError
from cmr.training.distributed import Distributed, init_from_env, is_main, write_on_main

SRC = Path(__file__).resolve().parents[1] / "src"


def torchrun(mode: str, out: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(ddp_worker.__file__)), mode, str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_ranks_shards_are_the_global_batch_in_order():
    rows = torch.randperm(12)
    shards = [Distributed(r, 3, r, "cpu").shard(rows) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert torch.equal(torch.cat(shards), rows)
    with pytest.raises(ConfigError, match="global batch of 12 pairs does not split evenly over 5 processes"):
        Distributed(0, 5, 0, "cpu").shard(rows)


def test_one_process_has_no_group_and_writes(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env("cpu") is None and is_main(None)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_env("cpu") is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 but RANK is not set; start the job with torchrun"):
        init_from_env("cpu")
    assert write_on_main(None, tmp_path / "out", lambda tmp: tmp.write_text("x"))
    assert (tmp_path / "out").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left


@pytest.mark.slow
def test_two_processes_take_the_single_process_steps(tmp_path):
    """Each step's loss and every gradient (heads: summed over ranks; logit_scale and the ce
    classifier, which the loss reads directly: averaged) equal one process on the global batch."""
    done = torchrun("steps", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = ddp_worker.run_steps()
    assert len(reference["grads"]) == 3  # 48 pairs, global batch 16
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["loss"] == pytest.approx(reference["loss"], rel=1e-6)
        for step, (want, have) in enumerate(zip(reference["grads"], got["grads"])):
            assert set(have) == set(want) and "loss.losses.ce.classifier.weight" in want
            for name in want:
                torch.testing.assert_close(have[name], want[name], atol=1e-6, rtol=1e-5,
                                           msg=lambda m: f"rank {rank} step {step} {name}: {m}")


@pytest.mark.slow
def test_two_processes_end_at_the_single_process_validation_score(tmp_path):
    done = torchrun("train", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result, model = ddp_worker.run_train()
    got = json.loads((tmp_path / "run" / "result.json").read_text())
    assert got["best_epoch"] == result.best_epoch and len(got["history"]) == 4
    assert got["best"] == pytest.approx(result.best, abs=1e-9)
    for have, want in zip(got["history"], result.history):
        assert have == pytest.approx(want, rel=1e-5, abs=1e-9)
    state = torch.load(tmp_path / "run" / "model.pt")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(state[name], value, atol=1e-5, rtol=1e-5)
    assert result.history[-1]["train/loss"] < result.history[0]["train/loss"]  # it did train


@pytest.mark.slow
def test_a_crashed_rank_fails_the_run_and_leaves_the_output_as_it_was(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text("previous")
    done = torchrun("crash", tmp_path)
    assert done.returncode != 0
    log = done.stdout + done.stderr
    assert "rank 1 fails on purpose after epoch 1" in log and "rank" in log and "ChildFailedError" in log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no half-written temporary beside it
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["result.json"]
    assert (tmp_path / "run" / "result.json").read_text() == "previous"
