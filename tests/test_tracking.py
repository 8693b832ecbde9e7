"""Tracking helpers: one unit for reported metrics, run names, the registry's model package, the lock."""
import os
import subprocess
import sys

import pytest
import torch

from cmr.retrieval.evaluation import in_percent


def test_in_percent_converts_fractions_only():
    m = {"val": {"t2i/R@1": 0.25, "i2t/R@10": 0.5, "rsum": 75.0, "t2i/MdR": 3.0, "mAP": 0.4,
                 "i2t/mINP_transductive": 0.1, "t2i/R@5_dual": 0.3},
         "counts": {"test_items": 10}, "flag": True}
    assert in_percent(m) == {"val": {"t2i/R@1": 25.0, "i2t/R@10": 50.0, "rsum": 75.0, "t2i/MdR": 3.0, "mAP": 40.0,
                                     "i2t/mINP_transductive": pytest.approx(10.0), "t2i/R@5_dual": 30.0},
                             "counts": {"test_items": 10}, "flag": True}


def test_run_name_says_what_differs_from_the_committed_params():
    from cmr.stages.register import run_name

    base = {"finetune": {"epochs": 8, "lr": 0.001}, "calibrate": {"method": "sinkhorn"}}
    assert run_name(base, base, "0123456789ab") == "params.yaml @01234567"
    changed = {"finetune": {"epochs": 4, "lr": 0.001}, "calibrate": {"method": "none"}, "extra": 1}
    assert run_name(changed, base, "0123456789ab", "exp-1") == \
        "exp-1: finetune.epochs=4 calibrate.method=none @01234567"


def test_queued_experiments_log_to_the_projects_store(monkeypatch, tmp_path):
    from cmr.stages.register import tracking_uri

    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert tracking_uri("sqlite:///mlruns/mlflow.db") == "sqlite:///mlruns/mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking_uri("sqlite:///mlruns/mlflow.db") == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


@pytest.mark.slow  # builds the offline towers four times: 15-60 s on two busy cores
def test_locked_offline_towers_are_referenced_and_rebuilt_exactly(lite0, tmp_path):
    from cmr.errors import ConfigError
    from cmr.models import save_two_tower
    from cmr.tracking.model_package import TOWERS_FILE, load_packaged, package_model

    save_two_tower(lite0.model, lite0.spec, tmp_path / "trained")
    full = sum(f.stat().st_size for f in (tmp_path / "trained").iterdir())
    info = package_model(tmp_path / "trained", tmp_path / "pkg")
    assert info["towers"] == "referenced" and info["bytes"] < full / 20
    loaded = load_packaged(tmp_path / "pkg").model.eval()
    tokens = lite0.tokenizer(["a red apple", "a computer"])
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(tokens), lite0.model.eval().encode_text(tokens))
    # a recorded digest that the installed towers do not match is refused, not loaded
    record = (tmp_path / "pkg" / TOWERS_FILE)
    record.write_text(record.read_text().replace(info["digest"], "0" * 64))
    with pytest.raises(ConfigError, match="installed offline towers .* differ"):
        load_packaged(tmp_path / "pkg")
    # towers that were trained are stored whole
    with torch.no_grad():
        next(lite0.model.clip.visual.parameters()).add_(1.0)
    try:
        save_two_tower(lite0.model, lite0.spec, tmp_path / "tuned")
        assert package_model(tmp_path / "tuned", tmp_path / "pkg2")["towers"] == "copied"
        assert not (tmp_path / "pkg2" / TOWERS_FILE).exists()
    finally:
        with torch.no_grad():
            next(lite0.model.clip.visual.parameters()).sub_(1.0)


def test_registry_lock_waits_for_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from cmr.errors import CmrError
    from cmr.tracking.locks import OWNER_TAG, lock_name, registry_lock
    from cmr.tracking.mlflow_log import configure

    configure(f"sqlite:///{tmp_path / 'mlflow.db'}", "t")
    client = mlflow.MlflowClient()
    with registry_lock(client, "m") as owner:
        with pytest.raises(CmrError, match=f"registry lock 'm.lock' is held by {owner}"):
            with registry_lock(client, "m", wait_s=0.5):
                pass
    assert client.search_registered_models() == []  # released
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    client.create_registered_model(lock_name("m"), tags={OWNER_TAG: f"{socket.gethostname()}:{dead.stdout.strip()}:x"})
    messages = []
    with registry_lock(client, "m", wait_s=5, log=messages.append):
        assert client.get_registered_model("m.lock").tags[OWNER_TAG].split(":")[1] == str(os.getpid())
    assert "is gone; taking it over" in messages[0]


def test_registry_lock_taken_by_a_create_whose_reply_was_lost_is_held_not_waited_for(tmp_path):
    """Over HTTP the client retries a request whose reply was lost: the lock model then exists
    with this holder's own tag, and the retry answers RESOURCE_ALREADY_EXISTS."""
    mlflow = pytest.importorskip("mlflow")
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS

    from cmr.tracking.locks import OWNER_TAG, registry_lock
    from cmr.tracking.mlflow_log import configure

    configure(f"sqlite:///{tmp_path / 'mlflow.db'}", "t")
    client = mlflow.MlflowClient()

    class RetriedCreate:
        def __getattr__(self, attr):
            return getattr(client, attr)

        def create_registered_model(self, name, **kw):
            client.create_registered_model(name, **kw)  # the first request went through
            raise MlflowException(f"Registered Model (name={name}) already exists.",
                                  error_code=RESOURCE_ALREADY_EXISTS)

    with registry_lock(RetriedCreate(), "m", wait_s=1.0) as owner:
        assert client.get_registered_model("m.lock").tags[OWNER_TAG] == owner
    assert client.search_registered_models() == []  # released
