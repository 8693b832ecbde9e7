"""Start or stop a shared MLflow tracking server: PostgreSQL backend store + served artifact root.

    python scripts/tracking_server.py start DIR [--port 5000] [--host 127.0.0.1] [--workers 2] [--mlflow-arg ARG]
    python scripts/tracking_server.py stop DIR

DIR holds everything: ``pgdata/`` (the PostgreSQL cluster, created on the first start),
``artifacts/`` (the artifact root the server serves as ``mlflow-artifacts:/``), ``pgpass``
(the database password, mode 600: it never appears on a command line), ``logs/`` and
``server.json`` (ports and process ids of the running pair). PostgreSQL listens on 127.0.0.1
only, on a free port; only the MLflow server talks to it. PostgreSQL refuses to run as root:
under root its commands run as the ``postgres`` user (which the Debian package creates).
Point the pipeline at the server with ``tracking.uri: http://<host>:<port>`` (params.yaml or
``--set``). Orchestration only: nothing in ``cmr`` imports this.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PG_USER, DB = "cmr", "mlflow"
INSTALL_HINT = "install PostgreSQL (Debian/Ubuntu: apt-get install postgresql) or set PG_BIN to its bin folder"


def pg_tool(name: str) -> str:
    """Path of a PostgreSQL program: $PG_BIN, PATH, then Debian's /usr/lib/postgresql/<version>/bin."""
    candidates = [os.path.join(os.environ["PG_BIN"], name)] if os.environ.get("PG_BIN") else []
    candidates += [shutil.which(name) or ""] + sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    sys.exit(f"tracking_server: {name} not found; {INSTALL_HINT}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_pg_owner(cmd: list[str]) -> list[str]:
    """``cmd`` run as the ``postgres`` user when we are root (postgres refuses root)."""
    if os.geteuid() != 0:
        return cmd
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        sys.exit("tracking_server: running as root needs a 'postgres' user to run PostgreSQL as "
                 "(apt-get install postgresql creates it), or run as an ordinary user")
    return ["runuser", "-u", "postgres", "--"] + cmd


def run(cmd: list[str], **kw) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        sys.exit(f"tracking_server: {' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-2000:]}")


def init_cluster(d: Path) -> None:
    """initdb with a random password for user ``cmr`` (scram-sha-256), written to ``d/pgpass``."""
    pgdata = d / "pgdata"
    pgdata.mkdir(mode=0o700)
    password = secrets.token_urlsafe(24)
    pwfile = d / "pgdata.pw"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    if os.geteuid() == 0:
        pg = pwd.getpwnam("postgres")
        for p in (pgdata, pwfile):
            os.chown(p, pg.pw_uid, pg.pw_gid)
        probe = subprocess.run(as_pg_owner(["test", "-w", str(pgdata)]))
        if probe.returncode != 0:
            shutil.rmtree(pgdata)
            pwfile.unlink()
            sys.exit(f"tracking_server: the postgres user cannot reach {pgdata}; choose a DIR whose parent "
                     f"folders it may enter (e.g. under /srv or a 755 folder in /tmp)")
    try:
        run(as_pg_owner([pg_tool("initdb"), "-D", str(pgdata), "-U", PG_USER, f"--pwfile={pwfile}",
                         "--auth=scram-sha-256", "-E", "UTF8", "--no-instructions"]))
    finally:
        pwfile.unlink()
    pgpass = d / "pgpass"
    pgpass.write_text(f"127.0.0.1:*:*:{PG_USER}:{password}\n")
    pgpass.chmod(0o600)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server not healthy after {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def start(d: Path, host: str, port: int | None, workers: int, extra: list[str] = ()) -> dict:
    d = d.resolve()
    if (d / "server.json").exists():
        sys.exit(f"tracking_server: {d / 'server.json'} exists: already running? (stop {d} first)")
    (d / "logs").mkdir(parents=True, exist_ok=True)
    (d / "artifacts").mkdir(exist_ok=True)
    if not (d / "pgdata" / "PG_VERSION").exists():
        init_cluster(d)
    pg_port, pg_log = free_port(), d / "logs" / "postgres.log"
    if os.geteuid() == 0:
        pg_log.touch()
        os.chown(pg_log, pwd.getpwnam("postgres").pw_uid, -1)
    run(as_pg_owner([pg_tool("pg_ctl"), "-D", str(d / "pgdata"), "-l", str(pg_log), "-w", "-t", "60", "-o",
                     f"-c listen_addresses=127.0.0.1 -p {pg_port} -c unix_socket_directories=''", "start"]))
    env = dict(os.environ, PGPASSFILE=str(d / "pgpass"), MLFLOW_DISABLE_TELEMETRY="true")
    backend = f"postgresql://{PG_USER}@127.0.0.1:{pg_port}/{DB}"
    mlflow_log = d / "logs" / "mlflow.log"
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=pg_port, user=PG_USER, dbname="postgres",
                                passfile=str(d / "pgpass"))
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB,))
            if cur.fetchone() is None:
                cur.execute(f"CREATE DATABASE {DB}")
        conn.close()
        exe = Path(sys.executable).with_name("mlflow")
        mlflow = str(exe) if exe.exists() else shutil.which("mlflow") or sys.exit("tracking_server: mlflow not found")
        # migrate once here: the server's workers would otherwise race to create the schema
        run([mlflow, "db", "upgrade", backend], env=env)
        port = port or free_port()
        with open(mlflow_log, "ab") as log:
            proc = subprocess.Popen([mlflow, "server", "--backend-store-uri", backend, "--artifacts-destination",
                                     str(d / "artifacts"), "--host", host, "--port", str(port),
                                     "--workers", str(workers), *extra],
                                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        state = {"url": url, "mlflow_pid": proc.pid, "mlflow_port": port, "postgres_port": pg_port,
                 "backend_store_uri": backend, "artifacts": str(d / "artifacts")}
        (d / "server.json").write_text(json.dumps(state, indent=2) + "\n")
        wait_healthy(url, proc, mlflow_log)
    except RuntimeError as e:
        stop(d)
        sys.exit(f"tracking_server: start failed: {e}")
    except BaseException:
        stop(d)
        raise
    return state


def stop(d: Path) -> None:
    """Stop the MLflow server (its whole process group) and PostgreSQL; safe to call twice."""
    d = d.resolve()
    state_file = d / "server.json"
    if state_file.exists():
        pid = json.loads(state_file.read_text())["mlflow_pid"]
        try:
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                os.killpg(pid, 0)
                time.sleep(0.2)
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        state_file.unlink()
    if (d / "pgdata" / "postmaster.pid").exists():
        run(as_pg_owner([pg_tool("pg_ctl"), "-D", str(d / "pgdata"), "-m", "fast", "-w", "stop"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="initialise (first time) and start PostgreSQL + mlflow server")
    s.add_argument("dir", type=Path)
    s.add_argument("--host", default="127.0.0.1", help="address the MLflow server listens on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="MLflow server port (default: a free one)")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--mlflow-arg", action="append", default=[], metavar="ARG",
                   help="passed on to `mlflow server` (repeatable), e.g. --mlflow-arg=--allowed-hosts=host0:5000")
    t = sub.add_parser("stop", help="stop both")
    t.add_argument("dir", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "start":
        t0 = time.monotonic()
        state = start(a.dir, a.host, a.port, a.workers, a.mlflow_arg)
        print(f"tracking server up in {time.monotonic() - t0:.1f} s: {state['url']} "
              f"(backend {state['backend_store_uri']}, artifacts {state['artifacts']})")
        print(f"point the pipeline at it: tracking.uri: {state['url']}   (or cmr --set tracking.uri={state['url']})")
    else:
        stop(a.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
