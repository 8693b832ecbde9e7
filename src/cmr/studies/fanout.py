"""Independent cells of a study, run one after another or as Prefect tasks on a Dask cluster.

``run_cells(fn, cells, runner)`` returns ``[fn(**cell) for cell in cells]`` in order, however
they ran. ``runner`` is the ``task_runner`` setting of ``params.yaml``:

* ``"sequential"``: a plain loop in this process (no Prefect, no retries);
* ``"dask"``: a Prefect flow whose task runner is ``prefect_dask.DaskTaskRunner`` on a
  ``distributed.LocalCluster`` of this machine's cores (one single-threaded worker process each,
  one cluster a process);
* ``"dask:tcp://host:8786"``: the same against a running cluster (``dask scheduler`` and
  ``dask worker tcp://host:8786`` on other machines, each with this package installed).

On Dask each cell is a Prefect task with ``retries``; a worker that dies mid-cell has its
cell run again elsewhere (by Dask, which reschedules work lost with a worker, or by a
Prefect retry when the cell raised). Cells must therefore be pure: arguments in, a
picklable result out, no MLflow runs and no files. A study logs its MLflow parent and
nested runs once, after every cell has returned, so a retried cell can leave neither a
duplicate nor an orphaned run.

Both runners show a bar of cells done, with the time left, as cells finish (on a terminal only,
:func:`cmr.progress.progress`); on Dask the bar counts cells in the order they finish, and the
results still come back in the order of ``cells``.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Sequence

from cmr.errors import ConfigError
from cmr.progress import progress
from cmr.registry import Registry

TASK_RUNNERS: Registry[Callable[..., list]] = Registry("task runner")
_SERVER_START_S = 180  # Prefect's default 20 s to start its temporary server is too tight on 2 busy cores


def parse_runner(spec: str) -> tuple[str, str | None]:
    """``"dask:tcp://h:8786"`` -> ``("dask", "tcp://h:8786")``; ``"sequential"`` -> ``("sequential", None)``."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"task_runner must be a string such as 'sequential' or 'dask', got {spec!r}")
    name, _, address = spec.partition(":")
    TASK_RUNNERS.get(name)  # an unknown name fails here, naming the registered ones
    if address and name != "dask":
        raise ConfigError(f"task_runner {spec!r}: only 'dask' takes a scheduler address")
    return name, address or None


def run_cells(fn: Callable[..., Any], cells: Sequence[dict], runner: str = "sequential", *,
              retries: int = 2, name: str = "cell") -> list:
    """``fn(**cell)`` for every cell, results in the order of ``cells``."""
    kind, address = parse_runner(runner)
    return TASK_RUNNERS.get(kind)(fn, list(cells), address=address, retries=retries, name=name)


@TASK_RUNNERS.register("sequential")
def _sequential(fn, cells, *, address=None, retries=0, name="cell") -> list:
    return [fn(**cell) for cell in progress(cells, len(cells), name, unit="cell")]


@contextlib.contextmanager
def prefect_api_for_workers() -> Iterator[str]:
    """Within the block ``PREFECT_API_URL`` names a Prefect API, in this process's settings and in
    ``os.environ`` for processes started inside it: the user's server when it is set, else
    Prefect's temporary local one. Without it every Dask worker process starts a temporary server of its
    own (30 s apiece here) and leaves it behind when the worker is killed."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    from prefect.server.api.server import SubprocessASGIServer

    # Prefect's own temporary server (one a process; a no-op when already running), left running for
    # the next wave of cells and stopped when this process exits, as Prefect does with it.
    server = SubprocessASGIServer()
    server.start(timeout=_SERVER_START_S)
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        os.environ.pop("PREFECT_API_URL", None)


_LOCAL_CLUSTER = []  # the one local cluster of this process, made on first use


def _local_cluster_address() -> str:
    """A ``LocalCluster`` of one single-threaded worker process a core (processes, not threads: a
    cell holds the GIL for most of its training loop), made once and shared by every wave of
    cells: a study's second wave on a fresh cluster paid worker start-up and imports again, and
    once, at load 20, lost both new workers to heartbeat timeouts and hung. Closed at exit."""
    if not _LOCAL_CLUSTER:
        import atexit

        import dask
        from distributed import LocalCluster

        # distributed's 30 s connect/tcp timeouts are too tight for 2 cores shared with other jobs
        with dask.config.set({"distributed.comm.timeouts.connect": "120s", "distributed.comm.timeouts.tcp": "120s"}):
            cluster = LocalCluster(n_workers=os.cpu_count() or 1, threads_per_worker=1, processes=True,
                                   dashboard_address=":0")  # any free port: 8787 may be taken
        atexit.register(cluster.close)
        _LOCAL_CLUSTER.append(cluster)
    return _LOCAL_CLUSTER[0].scheduler_address


@TASK_RUNNERS.register("dask")
def _dask(fn, cells, *, address=None, retries=2, name="cell") -> list:
    with prefect_api_for_workers():  # before the cluster, so that its workers inherit the API's address
        return _dask_flow(fn, cells, address or _local_cluster_address(), retries, name)


def _dask_flow(fn, cells, address, retries, name) -> list:
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.futures import as_completed
    from prefect_dask import DaskTaskRunner

    task_runner = DaskTaskRunner(address=address)
    # NO_CACHE: the inputs are feature tensors; hashing them for a cache key costs time and buys nothing
    cell_task = task(fn, name=name, retries=retries, retry_delay_seconds=0, cache_policy=NO_CACHE)

    @flow(name=f"cmr-{name}s", task_runner=task_runner)
    def fan_out() -> list:  # cells are not flow parameters: Prefect would send them to its API
        futures = [cell_task.submit(**cell) for cell in cells]
        for _done in progress(as_completed(futures), len(futures), name, unit="cell"):
            pass  # the bar advances as cells finish, in whatever order
        return [future.result() for future in futures]

    return fan_out()
