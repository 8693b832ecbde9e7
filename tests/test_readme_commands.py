"""Every command and snippet README.md tells a user to run is run by a test, or says why it is not.

``AUDIT`` maps each command of the README's ``bash`` blocks and each row of its Studies table to the test
that runs it. "as written": the test reads the command from README.md and runs it (``.venv/bin/`` is the
venv running the tests), so it fails when the README changes the command and the new one does not work.
"the same": the test runs the same code path with test-sized arguments. "not run": why not. The fast test
fails when the README gains a command that is not in ``AUDIT`` or loses one that is; the slow ones run the
commands in a tiny real project (160 items, `tests/test_pipeline_e2e.py`'s fixture).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from readme_commands import as_run, blocks, command, mentions, readme, shell_commands, study_commands
from test_pipeline_e2e import _env, _sh, project  # noqa: F401  (the tiny project fixture)

BIN = Path(sys.executable).parent
HERE = "tests/test_readme_commands.py"
E2E = "tests/test_pipeline_e2e.py"
AS_WRITTEN, SAME, NOT_RUN = "as written", "the same", "not run"

AUDIT: dict[str, tuple[str, str]] = {
    "make run": (NOT_RUN, "creates .venv/ (3 min install) and runs dvc repro on 2,250 images; its steps "
                          f"`cmr check`, `dvc repro`, `cmr metrics` run in {E2E}::test_dvc_repro_end_to_end "
                          f"and {HERE}::test_cli_commands_as_written"),
    "make test": (AS_WRITTEN, ".ci/run (CI), with `make test-slow`"),
    ".venv/bin/dvc metrics show": (AS_WRITTEN, f"{HERE}::test_dvc_commands_as_written"),
    ".venv/bin/dvc plots show": (AS_WRITTEN, f"{HERE}::test_dvc_commands_as_written"),
    ".venv/bin/dvc exp run -S finetune.epochs=4": (AS_WRITTEN, f"{HERE}::test_dvc_commands_as_written"),
    ".venv/bin/dvc exp run -S finetune.epochs=2": (AS_WRITTEN, f"{HERE}::test_dvc_commands_as_written"),
    ".venv/bin/dvc exp show --only-changed": (AS_WRITTEN, f"{HERE}::test_dvc_commands_as_written"),
    ".venv/bin/dvc exp run --queue -S 'calibrate.method=none,sinkhorn' && .venv/bin/dvc queue start -j 2":
        (AS_WRITTEN, f"{HERE}::test_queued_sweeps_as_written"),
    "make run-av": (SAME, "tests/test_av_pipeline.py::test_video_audio_pipeline_end_to_end (cmr --params "
                          "... pipeline, then metrics, on the embedded sample with 1 epoch each)"),
    ".venv/bin/cmr --params params/av.yaml study cmmixer": (SAME, "tests/test_av_pipeline.py::"
                                                                  "test_cmmixer_study_quick (--quick; the full study: 58 min)"),
    '.venv/bin/cmr search "a red apple" --k 5': (AS_WRITTEN, f"{HERE}::test_cli_commands_as_written"),
    ".venv/bin/cmr search --image my.jpg --k 5": (AS_WRITTEN, f"{HERE}::test_cli_commands_as_written"),
    ".venv/bin/cmr list losses": (AS_WRITTEN, f"{HERE}::test_cli_commands_as_written"),
    ".venv/bin/cmr stage finetune --set finetune.epochs=2": (AS_WRITTEN, f"{HERE}::test_cli_commands_as_written"),
    ".venv/bin/cmr check": (AS_WRITTEN, f"{HERE}::test_cli_commands_as_written"),
    ".venv/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db":
        (AS_WRITTEN, f"{HERE}::test_mlflow_ui_serves_the_projects_runs (plus --port: a free one)"),
    ".venv/bin/python scripts/tracking_server.py start /srv/cmr-tracking --port 5000":
        (SAME, "tests/test_tracking_server.py::test_two_registrations_at_once_on_a_postgres_tracking_server "
               "(a temporary folder and a free port; skipped without PostgreSQL)"),
    ".venv/bin/cmr --set tracking.uri=http://127.0.0.1:5000 pipeline":
        (SAME, "tests/test_tracking_server.py::test_two_registrations_at_once_on_a_postgres_tracking_server "
               "(the register stage against the server)"),
    ".venv/bin/python scripts/tracking_server.py stop /srv/cmr-tracking":
        (SAME, "tests/test_tracking_server.py::test_two_registrations_at_once_on_a_postgres_tracking_server"),
    ".venv/bin/python flows/pipeline.py": (SAME, f"{E2E}::test_prefect_flow_runs_the_same_stages"),
    ".venv/bin/python flows/retrain.py":
        (SAME, f"{E2E}::test_scheduled_retrain_skips_unchanged_data_and_retrains_on_new_data"),
    "PREFECT_SERVER_ANALYTICS_ENABLED=false .venv/bin/prefect server start":
        (AS_WRITTEN, f"{HERE}::test_prefect_serve_trigger_and_ctrl_c_as_written (PREFECT_SERVER_API_PORT: a "
                     "free port)"),
    'PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/python flows/retrain.py --serve --cron "0 3 * * *"':
        (AS_WRITTEN, f"{HERE}::test_prefect_serve_trigger_and_ctrl_c_as_written, and tests/test_retrain_cli.py::"
                     "test_ctrl_c_stops_serve_within_seconds_and_leaves_the_schedule_active"),
    "PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/prefect deployment run 'cmr-retrain/cmr-retrain-nightly'":
        (AS_WRITTEN, f"{HERE}::test_prefect_serve_trigger_and_ctrl_c_as_written"),
    ".venv/bin/cmr evaluate data/models/finetune --reader coco --source /data/coco":
        (SAME, "tests/test_evaluate_model.py::test_val_only_coco_folder_is_evaluated_whole_and_matches_a_direct_"
               "computation (a COCO-layout folder built from shared data; /data/coco is the user's)"),
    "torchrun --standalone --nproc_per_node 4 -m cmr.stages.pretrain":
        (SAME, "tests/test_distributed.py::test_the_pretrain_stage_under_torchrun_writes_what_one_process_writes "
               "(2 CPU processes, gloo)"),
    "torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint host0:29500 "
    "-m cmr.stages.pretrain": (NOT_RUN, "two hosts with 8 GPUs each"),
    ".venv/bin/dvc exp run --queue -S 'finetune.lr=0.0001,0.0005,0.001' -S 'finetune.batch_size=64,128'":
        (AS_WRITTEN, f"{HERE}::test_queued_sweeps_as_written (queued and checked, not run: 6 trainings)"),
    ".venv/bin/dvc exp run --queue -S 'calibrate.method=none,dsl,qbnorm,inverted_softmax,sinkhorn'":
        (AS_WRITTEN, f"{HERE}::test_queued_sweeps_as_written (queued and checked, not run)"),
    ".venv/bin/dvc queue start -j 2 && .venv/bin/dvc queue status":
        (AS_WRITTEN, f"{HERE}::test_queued_sweeps_as_written (status; `queue start -j 2` on the 2-cell sweep)"),
    ".venv/bin/prefect server start --host HOST": (NOT_RUN, "a cluster's machines; the study on a local Dask "
                                                            "cluster: tests/test_fanout.py::test_wikipedia_study_"
                                                            "on_dask_matches_sequential_and_mlflow_has_no_extra_runs"),
    ".venv/bin/dask scheduler": (NOT_RUN, "a cluster's machines (see above)"),
    "PREFECT_API_URL=http://HOST:4200/api .venv/bin/dask worker tcp://HOST:8786 --nworkers 4 --nthreads 1":
        (NOT_RUN, "a cluster's machines (see above)"),
    "PREFECT_API_URL=http://HOST:4200/api .venv/bin/cmr --set task_runner=dask:tcp://HOST:8786 study wikipedia":
        (SAME, "tests/test_fanout.py::test_dask_same_results_and_a_killed_worker_has_its_cell_retried "
               "(an existing cluster by address)"),
    # the Studies table
    "cmr study wikipedia": (SAME, "tests/test_studies_clip4cmr.py::test_wikipedia_study_quick (--quick)"),
    "cmr study clip4cmr_imbalance": (SAME, "tests/test_studies_clip4cmr.py::test_imbalance_study_quick"),
    "cmr study clip4cmr_sensitivity": (SAME, "tests/test_studies_clip4cmr.py::test_sensitivity_study_quick"),
    "cmr study calibration": (SAME, "tests/test_study_calibration.py::test_quick_study_writes_table_plot_and_one_"
                                    "parent_run"),
    "cmr study tbps": (SAME, "tests/test_tbps.py::test_quick_tbps_study_runs"),
    "cmr study generalisation": (NOT_RUN, "no test yet: --quick needs three datasets' backbone features "
                                          "(minutes on a cold cache)"),
    "cmr --params params/av.yaml study cmmixer": (SAME, "tests/test_av_pipeline.py::test_cmmixer_study_quick"),
    "cmr study compression": (NOT_RUN, "no test of the study yet (15 min; its parts: tests/test_compression.py)"),
    # the code blocks
    "python: the MLflow snippet": (AS_WRITTEN, f"{E2E}::test_dvc_repro_end_to_end"),
    "yaml: the table reader's settings": (AS_WRITTEN, f"{HERE}::test_table_reader_settings_as_written"),
}


def readme_items(text: str) -> list[str]:
    return [*shell_commands(text), *study_commands(text), "python: the MLflow snippet",
            "yaml: the table reader's settings"]


def test_every_readme_command_is_audited_and_its_tests_exist():
    text = readme()
    assert len(blocks(text, "python")) == 1 and len(blocks(text, "yaml")) == 1, "a new snippet: add it to AUDIT"
    listed = readme_items(text)
    assert sorted(set(listed)) == sorted(listed), "a README command appears twice"
    assert set(listed) - set(AUDIT) == set(), "README commands without an AUDIT entry"
    assert set(AUDIT) - set(listed) == set(), "AUDIT entries the README no longer has"
    for cmd, (kind, where) in AUDIT.items():
        assert kind in (AS_WRITTEN, SAME, NOT_RUN), cmd
        for ref in (w for w in where.replace(",", " ").split() if "::" in w):
            path, name = ref.split("::")
            assert name in mentions(REPO / path), f"{cmd}: {ref} does not exist"


def test_table_reader_settings_as_written(shared_datasets, tmp_path):
    """The README's `data:` block for the `table` reader is valid settings and reads Flickr8k's items.jsonl."""
    from cmr.check import check_settings
    from cmr.config import parse_params
    from cmr.data.prepare import prepare_dataset

    data = yaml.safe_load(blocks(readme(), "yaml")[0])["data"]
    assert data["source"] == "../shared/datasets/flickr8k"
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"] |= data | {"source": str(shared_datasets / "flickr8k")}
    raw["paths"] = {k: str(tmp_path / k) for k in raw["paths"]}
    p = parse_params(raw)
    check_settings(p)
    d = p.data
    items = prepare_dataset(d.reader, d.source, d.options, d.val_fraction, d.test_fraction, d.split_seed).items
    assert len(items) == 8091 and all(len(it.texts) == 5 for it in items[:100])


def _run(cmd: str, cwd: Path, check=True) -> subprocess.CompletedProcess:
    out = subprocess.run(["bash", "-c", as_run(cmd, BIN)], cwd=cwd, env=_env(cwd), capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def _pipeline(project: Path) -> None:
    if not (project / "data/reports/register.json").exists():
        _sh(["dvc", "repro"], project)


@pytest.mark.slow
def test_cli_commands_as_written(project):
    text = readme()
    _run(command(text, "cmr check"), project)
    _pipeline(project)
    hits = _run(command(text, 'cmr search "'), project).stdout.strip().splitlines()
    assert len(hits) == 5, hits
    first = json.loads((project / "data/raw/mini/items.jsonl").read_text().splitlines()[0])
    shutil.copy(project / "data/raw/mini" / first["image"], project / "my.jpg")
    hits = _run(command(text, "cmr search --image my.jpg"), project).stdout.strip().splitlines()
    assert len(hits) == 5, hits
    losses = _run(command(text, "cmr list losses"), project).stdout.split()
    assert {"infonce", "ncl", "supcon"} <= set(losses), losses
    _run(command(text, "cmr stage finetune --set"), project)
    assert json.loads((project / "data/models/finetune/metrics.json").read_text())


@pytest.mark.slow
def test_dvc_commands_as_written(project):
    """`dvc metrics show`, `dvc plots show`, two `dvc exp run -S`, `dvc exp show --only-changed`, `dvc metrics
    diff`: every revision's numbers (no `!`), a plots page with no network."""
    text = readme()
    _pipeline(project)
    shown = _run(command(text, "dvc metrics show"), project).stdout
    assert "val.rsum" in shown and "!" not in shown, shown
    _run(command(text, "dvc plots show"), project)
    html = (project / "dvc_plots/index.html").read_text()
    assert "<img" in html and "<script" not in html and "http" not in html, html[:2000]
    (project / ".gitignore").write_text((REPO / ".gitignore").read_text())
    _sh(["git", "add", "-A"], project)
    _sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "baseline"], project)
    for epochs in (4, 2):
        _run(command(text, f"dvc exp run -S finetune.epochs={epochs}"), project)
    table = _run(command(text, "dvc exp show --only-changed"), project).stdout
    assert "finetune.epochs" in table and "!" not in table, table
    rows = json.loads(_sh(["dvc", "exp", "show", "--json"], project).stdout)
    exps = [e["revs"][0]["data"] for row in rows for e in (row.get("experiments") or [])]
    assert sorted(e["params"]["params.yaml"]["data"]["finetune"]["epochs"] for e in exps) == [2, 4]
    assert all(e["metrics"]["data/reports/metrics.json"]["data"]["val"]["rsum"] > 0 for e in exps)
    diff = _run("dvc metrics diff", project)  # the README's prose: "`dvc metrics diff` against HEAD"
    assert "`dvc metrics diff` against HEAD" in text and "!" not in diff.stdout, diff.stdout


def _queue_status(project: Path) -> str:
    return _sh(["dvc", "queue", "status"], project).stdout


@pytest.mark.slow
def test_queued_sweeps_as_written(project):
    """The calibrator sweep runs on two queue workers and both rows have metrics; the Studies section's
    sweeps queue 6 + 5 experiments with the settings they name (not run here: 6 trainings)."""
    text = readme()
    _pipeline(project)
    if not (project / ".gitignore").exists():
        (project / ".gitignore").write_text((REPO / ".gitignore").read_text())
        _sh(["git", "add", "-A"], project)
        _sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "baseline"], project)
    before = {e["name"] for row in json.loads(_sh(["dvc", "exp", "show", "--json"], project).stdout)
              for e in (row.get("experiments") or [])}
    _run(command(text, "'calibrate.method=none,sinkhorn'"), project)
    t0 = time.monotonic()
    while any(w in _queue_status(project) for w in ("Queued", "Running")):
        assert time.monotonic() - t0 < 900, _queue_status(project)
        time.sleep(10)
    status = _queue_status(project)
    assert "Failed" not in status, status
    rows = json.loads(_sh(["dvc", "exp", "show", "--json"], project).stdout)
    new = [e["revs"][0]["data"] for row in rows for e in (row.get("experiments") or []) if e["name"] not in before]
    assert sorted(e["params"]["params.yaml"]["data"]["calibrate"]["method"] for e in new) == ["none", "sinkhorn"]
    assert all(e["metrics"]["data/reports/metrics.json"]["data"]["val"]["rsum"] > 0 for e in new)

    # queue the next ones only once the workers are gone (a worker stays 60 s after its queue empties and
    # would start them: 6 trainings)
    t0 = time.monotonic()
    while "Worker status: 0 active, 0 idle" not in _queue_status(project):
        assert time.monotonic() - t0 < 300, _queue_status(project)
        time.sleep(10)
    _run(command(text, "'finetune.lr="), project)
    _run(command(text, "'calibrate.method=none,dsl"), project)
    status = _run(command(text, "dvc queue start -j 2 && ").split(" && ")[1], project).stdout
    assert status.count("Queued") == 11, status
    _sh(["dvc", "queue", "remove", "--queued"], project)


@pytest.mark.slow
def test_mlflow_ui_serves_the_projects_runs(project, tmp_path):
    import urllib.request

    from prefect_local import free_port, start, stop, wait_for

    _pipeline(project)
    experiment = yaml.safe_load((project / "params.yaml").read_text())["tracking"]["experiment"]
    files = sorted(project.rglob("*"))
    port = free_port()
    log = tmp_path / "ui.log"
    proc = start(as_run(command(readme(), "mlflow ui"), BIN) + f" --port {port}", project, _env(project), log)
    try:
        def answers() -> bool:
            try:  # the project's experiment, through the UI's own API
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search"
                                            "?max_results=10", timeout=5) as r:
                    return experiment in {e["name"] for e in json.load(r)["experiments"]}
            except OSError:
                return False
        wait_for(answers, 180, "mlflow ui answers", proc, log)
    finally:
        stop(proc)
    assert sorted(project.rglob("*")) == files  # nothing written into the project


@pytest.mark.slow
def test_prefect_serve_trigger_and_ctrl_c_as_written(project, tmp_path):
    """The README's three Prefect lines in the project: the server, `--serve`, and `prefect deployment run`,
    whose run finds the data version registered; then Ctrl-C stops `--serve`."""
    from prefect_local import ctrl_c, env_for, prefect_server, readme_line, serve, wait_for

    _pipeline(project)
    if not (project / "flows").exists():
        (project / "flows").symlink_to(REPO / "flows")
    env = env_for(tmp_path) | {"PATH": _env(project)["PATH"], "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    log = tmp_path / "serve.log"
    with prefect_server(tmp_path, env) as api:
        proc = serve(project, env, api, log)
        trigger = subprocess.run(["bash", "-c", readme_line("prefect deployment run", api=api)], cwd=project,
                                 env=env, capture_output=True, text=True, timeout=300)
        assert trigger.returncode == 0, trigger.stdout + trigger.stderr
        wait_for(lambda: "nothing to retrain" in log.read_text(errors="replace"), 600, "the triggered run", proc, log)
        rc, _ = ctrl_c(proc, log)
        assert rc == 0, log.read_text()[-2000:]
