"""The README's local Prefect set-up for tests: `prefect server start` and `flows/retrain.py --serve` run as
the README writes them (its `.venv/bin/` being the venv that runs the tests), each in a process group of its
own, on a free port instead of 4200 so that tests never meet another server."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from readme_commands import as_run, command, readme

BIN = Path(sys.executable).parent
README_API = "http://127.0.0.1:4200/api"
SETTLE_S = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: str, cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """``bash -c cmd`` in a new session (so a signal can go to its whole group, as a terminal's Ctrl-C does).

    SIGINT keeps its default disposition, as in a terminal. A process that a non-interactive shell starts
    with ``&`` inherits SIGINT *ignored* (POSIX), and then no Python program stops on SIGINT: that, not
    Prefect, made ``--serve`` look hung when it was started that way by hand (SIGTERM stops it there)."""
    with open(log, "ab") as f:
        return subprocess.Popen(["bash", "-c", cmd], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """End a group started by ``start`` (SIGTERM, then SIGKILL after 20 s)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for(ready: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen, log: Path) -> float:
    """Seconds until ``ready()``; fails with the log's tail when ``proc`` ends first or time runs out."""
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not after {time.monotonic() - t0:.0f} s (exit {proc.poll()}):\n"
                                 + log.read_text(errors="replace")[-3000:])
        time.sleep(1)
    return time.monotonic() - t0


def healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=5) as r:
            return r.read().strip() == b"true"
    except OSError:
        return False


def env_for(tmp: Path) -> dict:
    env = dict(os.environ, PREFECT_HOME=str(tmp / "prefect"), PREFECT_SERVER_API_PORT=str(free_port()))
    env["PATH"] = f"{BIN}:{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1] / "src"),
                                                      env.get("PYTHONPATH")]))
    env.pop("PREFECT_API_URL", None)
    return env


@contextmanager
def prefect_server(tmp: Path, env: dict) -> Iterator[str]:
    """The README's `prefect server start`, on ``env``'s PREFECT_SERVER_API_PORT; yields its API URL."""
    api = f"http://127.0.0.1:{env['PREFECT_SERVER_API_PORT']}/api"
    log = tmp / "prefect-server.log"
    proc = start(as_run(command(readme(), "prefect server start", "ANALYTICS"), BIN), tmp, env, log)
    try:
        wait_for(lambda: healthy(api), 240, "prefect server healthy", proc, log)
        yield api
    finally:
        stop(proc)


def readme_line(*starts: str, api: str) -> str:
    """A README command of the Prefect section, pointed at ``api`` instead of the README's port 4200."""
    line = command(readme(), *starts)
    assert README_API in line, line
    return as_run(line.replace(README_API, api), BIN)


def serve(cwd: Path, env: dict, api: str, log: Path) -> subprocess.Popen:
    """The README's `flows/retrain.py --serve --cron ...`; returns once it says it serves."""
    proc = start(readme_line("flows/retrain.py --serve", api=api), cwd, env, log)
    wait_for(lambda: "is being served" in log.read_text(errors="replace"), 240, "--serve ready", proc, log)
    # a user's Ctrl-C comes later, once the runner polls and listens for cancellations
    time.sleep(SETTLE_S)
    return proc


def ctrl_c(proc: subprocess.Popen, log: Path, within: float = 20) -> tuple[int, float]:
    """SIGINT to the process group, as Ctrl-C in a terminal; (exit code, seconds to exit). Fails, after
    killing the group, when it is still running ``within`` seconds later."""
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        rc = proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"still running {within:.0f} s after Ctrl-C:\n" + log.read_text(errors="replace")[-3000:])
    return rc, time.monotonic() - t0
