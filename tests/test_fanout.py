"""Study cells on a task runner: sequential, or Prefect tasks on a Dask cluster (LocalCluster, 2 processes)."""
from __future__ import annotations

import io
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from cmr.errors import ConfigError, UnknownNameError
from cmr.studies.fanout import TASK_RUNNERS, parse_runner, run_cells

WIKI = Path("/work/shared/datasets/wikipedia_cmr")


def square(x: int, attempts: str | None = None, fail: str | None = None) -> dict:
    """A cell: records each attempt; on its first attempt it dies with its worker ('exit') or raises ('raise')."""
    first = False
    if attempts:
        log = Path(attempts)
        first = not log.exists()
        with log.open("a") as f:
            f.write(f"{os.getpid()}\n")
    if first and fail == "exit":
        os._exit(1)  # the worker process dies mid-cell, as when a machine goes away
    if first and fail == "raise":
        raise RuntimeError("a transient failure")
    return {"x": x, "square": x * x}


def test_parse_runner():
    assert parse_runner("sequential") == ("sequential", None)
    assert parse_runner("dask") == ("dask", None)
    assert parse_runner("dask:tcp://10.0.0.5:8786") == ("dask", "tcp://10.0.0.5:8786")
    with pytest.raises(UnknownNameError, match="unknown task runner 'dusk'.*did you mean 'dask'"):
        parse_runner("dusk")
    with pytest.raises(ConfigError, match="only 'dask' takes a scheduler address"):
        parse_runner("sequential:tcp://h:1")
    with pytest.raises(ConfigError, match="task_runner must be a string"):
        parse_runner(None)
    assert TASK_RUNNERS.names() == ["dask", "sequential"]


def test_sequential_runs_every_cell_in_order(tmp_path):
    cells = [{"x": x} for x in (3, 1, 2)]
    assert run_cells(square, cells) == [{"x": 3, "square": 9}, {"x": 1, "square": 1}, {"x": 2, "square": 4}]
    with pytest.raises(RuntimeError, match="transient"):  # no retries: today's behaviour
        run_cells(square, [{"x": 1, "attempts": str(tmp_path / "a"), "fail": "raise"}])


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_sequential_cells_show_a_bar_on_a_terminal_only(monkeypatch):
    tty = _Terminal()
    monkeypatch.setattr("sys.stderr", tty)
    assert run_cells(square, [{"x": x} for x in range(3)], name="squares") == [{"x": x, "square": x * x}
                                                                                for x in range(3)]
    assert "squares" in tty.getvalue() and "0/3" in tty.getvalue()
    pipe = io.StringIO()
    monkeypatch.setattr("sys.stderr", pipe)
    run_cells(square, [{"x": 1}], name="squares")
    assert pipe.getvalue() == ""


@pytest.fixture(scope="module")
def cluster(dask_cluster):
    """The 2-process LocalCluster of conftest, able to run this file's cells."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test file
    return dask_cluster


@pytest.mark.slow
def test_dask_same_results_and_a_killed_worker_has_its_cell_retried(cluster, tmp_path):
    runner = f"dask:{cluster.scheduler_address}"
    cells = [{"x": x} for x in range(6)]
    assert run_cells(square, cells, runner) == run_cells(square, cells)
    for fail in ("exit", "raise"):
        attempts = tmp_path / f"attempts-{fail}"
        cells = [{"x": x} for x in range(4)] + [{"x": 9, "attempts": str(attempts), "fail": fail}]
        out = run_cells(square, cells, runner, retries=2)
        assert out == [{"x": x, "square": x * x} for x in (0, 1, 2, 3, 9)]
        pids = attempts.read_text().split()
        assert len(pids) == 2, f"{fail}: the cell ran {len(pids)} times"
        if fail == "exit":  # the second attempt ran in another (or a restarted) worker process
            assert pids[0] != pids[1]


@pytest.mark.slow
def test_dask_without_an_address_makes_one_local_cluster_for_every_wave(cluster):
    from cmr.studies import fanout

    cells = [{"x": x} for x in range(4)]
    assert run_cells(square, cells, "dask") == run_cells(square, cells)
    first = fanout._LOCAL_CLUSTER[0]
    assert run_cells(square, cells[:2], "dask") == run_cells(square, cells[:2])
    assert fanout._LOCAL_CLUSTER == [first] and len(first.workers) == (os.cpu_count() or 1)
    fanout._LOCAL_CLUSTER.clear()
    first.close()  # here, not at exit, where pytest has closed the streams it logs to


@pytest.mark.slow
@pytest.mark.skipif(not (WIKI / "wikipedia_cmr.npz").is_file(), reason="wikipedia_cmr not available")
def test_wikipedia_study_on_dask_matches_sequential_and_mlflow_has_no_extra_runs(cluster, tmp_path, monkeypatch):
    """The quick study on the cluster, with one worker killed while cells run: same table as the
    sequential run, and MLflow holds one parent and one nested run per cell for each."""
    import mlflow
    from distributed import Client

    from cmr.config import load_params
    from cmr.studies import load_all

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("CMR_WIKIPEDIA", str(WIKI))
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = load_all().get("wikipedia")
    results = {}
    for runner in ("sequential", f"dask:{cluster.scheduler_address}"):
        p = load_params(repo / "params.yaml", {"tracking.uri": uri, "task_runner": runner})
        killer = None
        if runner != "sequential":
            killer = threading.Thread(target=_kill_a_busy_worker, args=(cluster.scheduler_address,))
            killer.start()
        start = time.perf_counter()
        results[runner] = study(p, quick=True)
        print(f"{runner}: {time.perf_counter() - start:.1f} s")
        if killer:
            killer.join()
            assert killed, "no worker was killed while cells ran"
    seq, dask = results.values()
    for name, stats in seq["summary"].items():
        for key, (mean, std) in stats.items():
            assert dask["summary"][name][key][0] == pytest.approx(mean, abs=1e-6)
            assert dask["summary"][name][key][1] == pytest.approx(std, abs=1e-6)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[p.tracking.experiment], output_format="list")
    parents = {r["run_id"] for r in results.values()}
    assert {r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags} == parents
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
        names = [r.info.run_name for r in children]
        assert len(names) == len(set(names)) == 3 + 3 * 2  # 3 objectives x (1 grid point + 2 seeds)
        assert all(r.info.status == "FINISHED" for r in children)
    with Client(cluster.scheduler_address) as client:
        client.wait_for_workers(2, timeout=60)


killed: list[int] = []


def _kill_a_busy_worker(address: str, timeout: float = 300) -> None:
    """Kill (SIGKILL) the process of a worker that is running a cell, once one is."""
    import signal

    from distributed import Client

    with Client(address) as client:
        deadline = time.time() + timeout
        while time.time() < deadline:
            busy = [w for w, tasks in client.processing().items() if tasks]
            if busy:
                time.sleep(1.0)  # well into the cell
                pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.2)
