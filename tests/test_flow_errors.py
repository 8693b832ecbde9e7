"""The Prefect flows' entry points end a run that fails on a bad folder, a full disk or a missing
file in one line naming the path, exit 2, and print no traceback (Prefect's console log included)."""
import os
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.slow  # each test starts an ephemeral Prefect server (15-30 s)

@pytest.fixture(scope="module")
def prefect_env(repo_root, tmp_path_factory) -> dict:
    """One Prefect home for the module: the second ephemeral server starts faster."""
    env = dict(os.environ, PREFECT_HOME=str(tmp_path_factory.mktemp("prefect")),
               PYTHONPATH=str(repo_root / "src"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    env.pop("PREFECT_API_URL", None)
    return env


def _run(args: list[str], env: dict, cwd) -> tuple[int, str, list[str]]:
    out = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    both = out.stdout + out.stderr
    return out.returncode, both, [line for line in both.splitlines() if ": error: " in line]


def _unwritable_folder(tmp_path):
    """A folder nothing can be written in: read-only, or (as root, who writes anywhere) a file
    standing where the output folder's parent should be."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):
        ro.rmdir()
        ro.write_text("a file, not a folder\n")
    return ro


def test_pipeline_flow_on_a_read_only_output_folder_is_one_line(repo_root, tmp_path, prefect_env):
    ro = _unwritable_folder(tmp_path)
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["paths"] = {k: str(ro / "out" / k) for k in raw["paths"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    try:
        rc, output, errors = _run(["flows/pipeline.py", "--params", str(tmp_path / "params.yaml")], prefect_env,
                                  repo_root)
    finally:
        if ro.is_dir():
            ro.chmod(0o755)
    assert rc == 2, output[-3000:]
    assert "Traceback" not in output
    assert len(errors) == 1 and errors[0].startswith("pipeline.py: error: paths: ")
    assert f"cannot write in {ro} (" in errors[0]


def test_an_os_error_inside_a_retrain_flow_run_is_one_line(repo_root, tmp_path, prefect_env):
    # a full disk while the ingest task writes: the OSError is raised inside the flow run
    full = tmp_path / "out" / "prepared"
    code = ("import errno, sys; sys.path.insert(0, 'flows'); import retrain; import cmr.stages.ingest as ingest\n"
            "def full_disk(p):\n"
            f"    raise OSError(errno.ENOSPC, 'No space left on device', {str(full)!r})\n"
            "ingest.from_params = full_disk\n"
            "sys.exit(retrain.main(['--force']))\n")
    rc, output, errors = _run(["-c", code], prefect_env, repo_root)
    assert rc == 2, output[-3000:]
    assert "Traceback" not in output
    assert errors == [f"retrain.py: error: No space left on device: {full}"]
    assert "Task run 'ingest" in output  # it did fail inside a Prefect task run
