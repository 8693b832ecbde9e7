"""The whole pipeline on a tiny real subset of the embedded default: dvc repro, MLflow, bad input, Prefect."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import DEFAULT_DATA, REPO
from readme_commands import python_snippet, readme

pytestmark = pytest.mark.slow
N_ITEMS = 160


def _env(tmp: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env["PREFECT_HOME"] = str(tmp / ".prefect")
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
    return env


def _sh(cmd: list[str], cwd: Path, check=True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=_env(cwd), capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A throw-away project: the repo's dvc.yaml and code, a small params.yaml, 160 real items."""
    tmp = tmp_path_factory.mktemp("proj")
    data = tmp / "data" / "raw" / "mini"
    data.mkdir(parents=True)
    lines = (DEFAULT_DATA / "items.jsonl").read_text().splitlines()[:N_ITEMS]
    (data / "items.jsonl").write_text("\n".join(lines) + "\n")
    for line in lines:
        rel = json.loads(line)["image"]
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DEFAULT_DATA / rel, data / rel)
    (tmp / "src").symlink_to(REPO / "src")
    shutil.copy(REPO / "dvc.yaml", tmp / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = "data/raw/mini"
    params["data"]["val_fraction"], params["data"]["test_fraction"] = 0.2, 0.25
    for section in ("pretrain", "finetune"):
        params[section].update(epochs=2, batch_size=32)
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    _sh(["git", "init", "-q"], tmp)
    _sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init"], tmp)
    _sh(["dvc", "init", "-q"], tmp)
    _sh(["dvc", "config", "core.analytics", "false"], tmp)
    return tmp


def test_dvc_repro_end_to_end(project):
    _sh(["dvc", "repro"], project)
    metrics = json.loads((project / "data/reports/metrics.json").read_text())
    test = metrics["test"]
    assert set(test) == {"none", "sinkhorn"}
    for direction in ("t2i", "i2t"):
        # one unit for every metric: R@K in percent, as rsum (= the sum of the six R@K)
        assert 0 <= test["none"][f"{direction}/R@1"] <= test["none"][f"{direction}/R@10"] <= 100
    assert test["none"]["rsum"] == pytest.approx(sum(test["none"][f"{d}/R@{k}"] for d in ("t2i", "i2t")
                                                     for k in (1, 5, 10)))
    # a trained model beats random ranking on held-out items
    assert test["none"]["rsum"] > metrics["random"]["rsum"] + 10
    plot = (project / "data/reports/plots/recall_at_k.csv").read_text().splitlines()
    assert plot[0].split(",") == ["k", "t2i_none", "i2t_none", "t2i_calibrated", "i2t_calibrated"]
    assert len(plot) > 10  # one row per K
    # the plots render with no network: images, and a page that loads no script from elsewhere
    page = project / "plots_page"
    _sh(["dvc", "plots", "show", "-o", str(page)], project)
    html = (page / "index.html").read_text()
    assert "<script" not in html and "http" not in html, html[:2000]
    images = re.findall(r'<img src="([^"]+)"', html)
    assert len(images) == 2 and all((page / src).is_file() and (page / src).read_bytes()[:4] == b"\x89PNG"
                                    for src in images), images
    reg = json.loads((project / "data/reports/register.json").read_text())
    assert reg["alias_moved"] and "no champion yet" in reg["decision"]

    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{project}/mlruns/mlflow.db")
    client = MlflowClient()
    mv = client.get_model_version_by_alias("cmr-default", "champion")
    run = client.get_run(mv.run_id)
    assert run.data.tags["git_commit"] != "unknown" and len(run.data.tags["data_version"]) >= 8
    assert run.data.tags["dvc_data_md5"] not in ("", "None")
    assert "val/rsum" in run.data.metrics and "test/sinkhorn/t2i/R_at_1" in run.data.metrics
    assert "champion_decision" in run.data.tags
    assert not run.info.run_name.startswith("pipeline@") and run.info.run_name.startswith("params.yaml @")
    # the registered copy is code + heads: no pickle, and the locked offline towers are referenced
    files = [f for f in Path(mlflow.artifacts.download_artifacts(f"models:/cmr-default/{mv.version}")).rglob("*")
             if f.is_file()]
    assert not [f for f in files if f.suffix in (".pkl", ".pickle")], files
    assert {"towers.json", "heads.safetensors", "pyfunc_model.py"} <= {f.name for f in files}
    assert sum(f.stat().st_size for f in files) < 10e6  # the towers alone are ~100 MB
    assert run.data.tags["registered_towers"] == "referenced"
    # the README's MLflow snippet, as written, from the project root: loads the champion (MLflow
    # refuses pickled pyfuncs by default, so loading proves none is unpickled) and leaves no stray store
    snippet = python_snippet(readme(), "## MLflow")
    files = sorted(project.rglob("*"))
    out = _sh([sys.executable, "-c", snippet], project)
    assert "(2, 256)" in out.stdout, out.stdout + out.stderr[-2000:]
    assert sorted(project.rglob("*")) == files  # no stray store (it once left an mlflow.db) or other file

    # no-op second run: nothing re-executes
    again = _sh(["dvc", "repro"], project)
    assert "Running stage" not in again.stdout

    # a forced rerun of a training stage reproduces its output bit for bit: same hash in
    # dvc.lock, so nothing after it is out of date (a wall time in the output broke this once)
    def out_hash(stage):
        return yaml.safe_load((project / "dvc.lock").read_text())["stages"][stage]["outs"][0]["md5"]

    before = out_hash("pretrain")
    _sh(["dvc", "repro", "--force", "--single-item", "pretrain"], project)
    assert out_hash("pretrain") == before
    assert "up to date" in _sh(["dvc", "status"], project).stdout

    # the CLI searches the index
    out = _sh([sys.executable, "-m", "cmr.cli", "search", "a computer", "--k", "3"], project)
    assert len([ln for ln in out.stdout.splitlines() if ln.strip()]) == 3


def test_bad_input_stops_at_validate_and_touches_nothing_downstream(project):
    if not (project / "data/reports/metrics.json").exists():
        _sh(["dvc", "repro"], project)
    before = {p: _tree_digest(project / p) for p in ("data/models", "data/embeddings")}
    metrics_before = (project / "data/reports/metrics.json").read_bytes()
    items = project / "data/raw/mini/items.jsonl"
    good = items.read_text()
    rows = good.splitlines()
    bad = json.loads(rows[4])
    bad["title"], bad["description"] = "x", None  # one character: under min_text_chars
    rows[4] = json.dumps(bad)
    items.write_text("\n".join(rows) + "\n")
    try:
        out = _sh(["dvc", "repro"], project, check=False)
        assert out.returncode != 0
        msg = out.stdout + out.stderr
        assert "items.jsonl" in msg and "texts" in msg, msg[-2000:]
        assert {p: _tree_digest(project / p) for p in before} == before
        assert (project / "data/reports/metrics.json").read_bytes() == metrics_before
    finally:
        items.write_text(good)


def test_champion_moves_only_on_improvement(project, monkeypatch):
    """Registering the same outputs again gives an equal score: a new version, but the alias stays."""
    if not (project / "data/reports/register.json").exists():
        _sh(["dvc", "repro"], project)
    from cmr.config import load_params
    from cmr.stages import register

    first = json.loads((project / "data/reports/register.json").read_text())
    monkeypatch.chdir(project)
    out = register.from_params(load_params("params.yaml"))
    assert out["version"] != first["version"]
    assert not out["alias_moved"] and out["decision"].startswith(f"kept v{first['version']}")


def test_prefect_flow_runs_the_same_stages(project):
    out = _sh([sys.executable, str(REPO / "flows/pipeline.py")], project)
    assert "kept v" in out.stdout or "moved to v" in out.stdout


def test_scheduled_retrain_skips_unchanged_data_and_retrains_on_new_data(project):
    if not (project / "data/reports/register.json").exists():
        _sh(["dvc", "repro"], project)
    out = _sh([sys.executable, str(REPO / "flows/retrain.py")], project)
    assert "nothing to retrain" in out.stdout + out.stderr
    items = project / "data/raw/mini/items.jsonl"
    good = items.read_text()
    items.write_text("\n".join(good.splitlines()[:-3]) + "\n")  # the data changed: three items fewer
    try:
        out = _sh([sys.executable, str(REPO / "flows/retrain.py")], project)
        log = out.stdout + out.stderr
        assert "retraining" in log and "'retrained': True" in log
    finally:
        items.write_text(good)


def test_dvc_experiments_show_both_rows_metrics(project):
    """The README's experiment commands: two `dvc exp run -S ...` and `dvc exp show` has both rows' metrics."""
    if not (project / "data/reports/metrics.json").exists():
        _sh(["dvc", "repro"], project)
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    (project / ".gitignore").write_text((REPO / ".gitignore").read_text())
    _sh(["git", "add", "-A"], project)
    _sh([*git, "commit", "-qm", "baseline"], project)
    for bank in (50, 100):  # a calibration setting: only calibrate and what follows it re-run
        _sh(["dvc", "exp", "run", "-S", f"calibrate.max_bank={bank}"], project)
    table = json.loads(_sh(["dvc", "exp", "show", "--json"], project).stdout)
    exps = [e for row in table for e in (row.get("experiments") or [])]
    rsums = []
    for exp in exps:
        rev = exp["revs"][0]
        metrics = rev["data"]["metrics"]["data/reports/metrics.json"]["data"]
        rsums.append(metrics["val"]["rsum"])
        assert rev["data"]["params"]["params.yaml"]["data"]["calibrate"]["max_bank"] in (50, 100)
    assert len(rsums) == 2 and all(0 < r <= 600 for r in rsums), table
    diff = _sh(["dvc", "metrics", "diff", "--json"], project).stdout
    assert "!" not in diff
