"""flows/retrain.py's command line: --serve without a Prefect server is refused at once (an ephemeral
server has no scheduler, so the deployment would never run and the process would only wait); Ctrl-C stops
--serve on a real local server."""
import os
import subprocess
import sys

import pytest


def test_serve_without_a_prefect_server_is_a_one_line_error(repo_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(repo_root / "src")}
    out = subprocess.run([sys.executable, "flows/retrain.py", "--serve"], cwd=repo_root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("retrain.py: error: --serve needs a running Prefect server")


@pytest.mark.slow  # a real `prefect server start`: 20-60 s on two shared cores
def test_ctrl_c_stops_serve_within_seconds_and_leaves_the_schedule_active(repo_root, tmp_path):
    """The README's local server and `flows/retrain.py --serve`, then Ctrl-C (SIGINT to the process group, as a
    terminal sends it): Prefect's runner shuts down and the process exits 0 within seconds."""
    from prefect_local import ctrl_c, env_for, prefect_server, serve

    env = env_for(tmp_path)
    log = tmp_path / "serve.log"
    with prefect_server(tmp_path, env) as api:
        proc = serve(repo_root, env, api, log)
        rc, seconds = ctrl_c(proc, log)
        text = log.read_text()
        assert rc == 0 and "Received KeyboardInterrupt, shutting down" in text and "Traceback" not in text, text
        # stopping --serve does not pause the schedule (the README says so)
        shown = subprocess.run([sys.executable, "-m", "prefect", "deployment", "inspect",
                                "cmr-retrain/cmr-retrain-nightly"], env=env | {"PREFECT_API_URL": api},
                               capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0, shown.stderr[-2000:]
        assert "'paused': False" in shown.stdout and "'active': True" in shown.stdout, shown.stdout[-2000:]
    print(f"exited {rc} {seconds:.1f} s after Ctrl-C")
