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
@pytest.mark.parametrize("mode", ["steps", "steps-triplet"])
def test_two_processes_take_the_single_process_steps(tmp_path, mode):
    """Each step's loss and every gradient (heads: summed over ranks; logit_scale and the ce
    classifier, which the loss reads directly: averaged) equal one process on the global batch;
    under triplet, logit_scale has no gradient in either."""
    done = torchrun(mode, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = ddp_worker.run_steps(mode=mode)
    assert (reference["grads"][0]["model.logit_scale"] is None) == (mode == "steps-triplet")
    assert len(reference["grads"]) == 3  # 48 pairs, global batch 16
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(got["grads"]) == 3
        for step, (want, have) in enumerate(zip(reference["grads"], got["grads"])):
            assert set(have) == set(want) and "loss.losses.ce.classifier.weight" in want
            for name in want:
                if want[name] is None:
                    assert have[name] is None, f"rank {rank} step {step} {name}: a gradient where one process has none"
                    continue
                torch.testing.assert_close(have[name], want[name], atol=1e-6, rtol=1e-5,
                                           msg=lambda m: f"rank {rank} step {step} {name}: {m}")
        assert got["loss"] == pytest.approx(reference["loss"], rel=1e-6)  # the epoch's mean global loss


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


@pytest.mark.slow
def test_the_pretrain_stage_under_torchrun_writes_what_one_process_writes(tmp_path):
    """`torchrun -m cmr.stages.pretrain` on 80 real items: same selected epoch, history and validation
    metrics as the single-process stage."""
    import shutil

    import yaml

    from conftest import DEFAULT_DATA, REPO

    data = tmp_path / "data" / "raw" / "mini"
    data.mkdir(parents=True)
    lines = (DEFAULT_DATA / "items.jsonl").read_text().splitlines()[:80]
    (data / "items.jsonl").write_text("\n".join(lines) + "\n")
    for line in lines:
        rel = json.loads(line)["image"]
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DEFAULT_DATA / rel, data / rel)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source="data/raw/mini", val_fraction=0.2, test_fraction=0.2)
    params["pretrain"].update(epochs=3, batch_size=16)
    params["device"] = "cpu"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)

    def run(*cmd):
        done = subprocess.run([sys.executable, *cmd], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stderr

    run("-m", "cmr.stages.ingest")
    # ranks first: rank 0 fills the feature cache while rank 1 waits, then reads it; one process reads it too
    log = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cmr.stages.pretrain",
              "--set", "paths.pretrained=data/two")
    run("-m", "cmr.stages.pretrain", "--set", "paths.pretrained=data/one")
    assert log.count("pretrain: epoch 3/") == 1  # rank 0 alone logs
    one, two = ({name: json.loads((tmp_path / "data" / d / name).read_text())
                 for name in ("metrics.json", "history.json", "training.json")} for d in ("one", "two"))
    assert two["training.json"] == one["training.json"]  # best epoch, seed, data version, backbone
    assert two["metrics.json"] == pytest.approx(one["metrics.json"], rel=1e-5)
    assert len(two["history.json"]) == 3
    for have, want in zip(two["history.json"], one["history.json"]):
        assert have == pytest.approx(want, rel=1e-4)
