"""flows/retrain.py's command line: --serve without a Prefect server is refused at once (an ephemeral
server has no scheduler, so the deployment would never run and the process would only wait)."""
import os
import subprocess
import sys


def test_serve_without_a_prefect_server_is_a_one_line_error(repo_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(repo_root / "src")}
    out = subprocess.run([sys.executable, "flows/retrain.py", "--serve"], cwd=repo_root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("retrain.py: error: --serve needs a running Prefect server")
