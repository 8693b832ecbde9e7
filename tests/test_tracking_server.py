"""A shared tracking store: `mlflow server` on PostgreSQL, two registrations of a tiny pipeline at once.

The server is started by ``scripts/tracking_server.py`` as the README says. One tiny pipeline
(the end-to-end test's project) runs up to ``evaluate``; its project is copied twice, each copy's
validation score set to a known value, and both copies run the real ``register`` stage at the
same time against the server. Running two whole pipelines at once would only add minutes of
training on two shared cores; what the store must survive is two registrations at once.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from test_pipeline_e2e import _env, _sh, project  # noqa: F401  (the tiny project fixture)

pytestmark = pytest.mark.slow
SCRIPT = REPO / "scripts" / "tracking_server.py"


def _missing() -> str | None:
    spec = importlib.util.spec_from_file_location("tracking_server", SCRIPT)
    ts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ts)
    for tool in ("initdb", "pg_ctl", "postgres"):
        try:
            ts.pg_tool(tool)
        except SystemExit:
            return f"PostgreSQL's {tool} is not installed (apt-get install postgresql)"
    if importlib.util.find_spec("psycopg2") is None:
        return "psycopg2 is not installed (pip install -r requirements.lock)"
    if os.geteuid() == 0:
        import pwd
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
    return None


@pytest.fixture(scope="module")
def server():
    """PostgreSQL + mlflow server in a temporary folder (755: under root, postgres runs as 'postgres')."""
    if reason := _missing():
        pytest.skip(reason)
    d = Path(tempfile.mkdtemp(prefix="cmr-tracking-"))
    d.chmod(0o755)
    try:
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, str(SCRIPT), "start", str(d / "srv")], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        state = json.loads((d / "srv" / "server.json").read_text())
        state["start_s"] = time.monotonic() - t0
        yield state
    finally:
        subprocess.run([sys.executable, str(SCRIPT), "stop", str(d / "srv")], capture_output=True, text=True)
        shutil.rmtree(d, ignore_errors=True)


def _with_score(src: Path, dst: Path, rsum: float) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    metrics_file = dst / "data" / "reports" / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    metrics["val"]["rsum"] = rsum
    metrics_file.write_text(json.dumps(metrics))
    return dst


def test_two_registrations_at_once_on_a_postgres_tracking_server(server, project, tmp_path):
    _sh(["dvc", "repro", "evaluate"], project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    name, alias = params["register"]["model_name"], params["register"]["alias"]
    scores = {"a": 111.25, "b": 222.5}
    copies = {k: _with_score(project, tmp_path / k, s) for k, s in scores.items()}
    t0 = time.monotonic()
    procs = {k: subprocess.Popen([sys.executable, "-m", "cmr.cli", "--set", f"tracking.uri={server['url']}",
                                  "stage", "register"], cwd=c, env=_env(c), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for k, c in copies.items()}
    logs = {k: p.communicate(timeout=600)[0] for k, p in procs.items()}
    register_s = time.monotonic() - t0
    for k, p in procs.items():
        assert p.returncode == 0, logs[k][-4000:]
    waited = sum("is held by" in log for log in logs.values())
    print(f"server start {server['start_s']:.1f} s; two registrations at once {register_s:.1f} s; "
          f"{waited} waited for the other's registry lock")
    outs = {k: json.loads((c / "data/reports/register.json").read_text()) for k, c in copies.items()}

    import mlflow

    mlflow.set_tracking_uri(server["url"])
    client = mlflow.MlflowClient()
    by_version = {outs[k]["version"]: k for k in outs}
    assert sorted(by_version, key=int) == ["1", "2"]
    first, second = by_version["1"], by_version["2"]
    assert str(client.get_model_version_by_alias(name, alias).version) == outs["b"]["version"]  # the better one
    same = "(logged with the same data_version, eval_settings)"
    expected = {first: f"moved to v1: val/rsum={scores[first]:.4f} (no champion yet)"}
    if scores[second] > scores[first]:
        expected[second] = (f"moved to v2: val/rsum={scores[second]:.4f} > champion v1's {scores[first]:.4f} "
                            f"{same}")
    else:
        expected[second] = f"kept v1: new v2 val/rsum={scores[second]:.4f} <= champion's {scores[first]:.4f} {same}"
    for k, out in outs.items():
        run = client.get_run(out["run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["champion_decision"] == expected[k] == out["decision"]
        assert client.get_model_version(name, out["version"]).tags["champion_decision"] == expected[k]
        assert run.data.metrics["val/rsum"] == scores[k]
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # served by the server, not a local path
        logged = {a.path for a in client.list_artifacts(out["run_id"])}
        assert {"metrics", "validation", "plots", "params"} <= logged, logged
        on_disk = Path(server["artifacts"]) / run.info.artifact_uri.removeprefix("mlflow-artifacts:/")
        assert (on_disk / "metrics" / "metrics.json").is_file()  # in the server's artifact root
    assert [m.name for m in client.search_registered_models()] == [name]  # the lock is released
    champion = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@{alias}", dst_path=str(tmp_path / "dl")))
    assert list(champion.rglob("spec.json")), "the champion's model files are not in the artifact store"
