"""Prefect flow: the pipeline's stages as tasks, calling the same ``from_params`` as ``dvc repro``.

    python flows/pipeline.py                 # ephemeral Prefect, no server needed
    python flows/pipeline.py --params my.yaml
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

for _k, _v in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
               "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
               # the default 20 s start-up of the ephemeral server is too tight on 2 busy cores
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}.items():
    os.environ.setdefault(_k, _v)

from prefect import flow, task  # noqa: E402

from cmr.check import check_settings  # noqa: E402
from cmr.cli import STAGES  # noqa: E402
from cmr.config import Params, load_params  # noqa: E402
from cmr.errors import CmrError  # noqa: E402
from cmr.stages._common import one_line_errors  # noqa: E402


def stage_task(name: str):
    """The stage's own ``from_params`` as a Prefect task (no second copy of its logic)."""
    module = importlib.import_module(f"cmr.stages.{name}")
    return task(name=name, retries=0)(module.from_params)


def run_stages(p: Params, names=STAGES) -> dict:
    results = {}
    for name in names:
        results[name] = stage_task(name)(p)
    return results


@flow(name="cmr-pipeline", log_prints=True)
def pipeline(params_path: str = "params.yaml") -> dict:
    p = load_params(params_path)
    check_settings(p)  # every setting and the source, before any stage replaces an output
    results = run_stages(p)
    return {"register": results["register"], "test": results["evaluate"]["test"]}


class _NoTracebackForUserErrors(logging.Filter):
    """On the console, a run that failed on a CmrError or an OSError (a bad setting, a read-only
    folder, a full disk) logs its message without the traceback: the entry point says it in
    one line. Prefect's API handler has already sent the record, traceback and all, to the
    run's logs on the server (a run logger's own handlers come before the root's console)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (CmrError, OSError)):
            record.exc_info, record.exc_text = None, None
        return True


def one_line_flow_errors(prog: str, body) -> int:
    """:func:`cmr.stages._common.one_line_errors` for a flow: also keeps Prefect's console log free
    of the traceback of such an error."""
    from prefect.logging.handlers import PrefectConsoleHandler

    quiet = _NoTracebackForUserErrors()
    consoles = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    for handler in consoles:
        handler.addFilter(quiet)
    try:
        return one_line_errors(prog, body)
    finally:
        for handler in consoles:
            handler.removeFilter(quiet)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    a = ap.parse_args(argv)
    return one_line_flow_errors("pipeline.py", lambda: print(pipeline(a.params)["register"]["decision"]))


if __name__ == "__main__":
    sys.exit(main())
