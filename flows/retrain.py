"""Scheduled retraining: re-ingest, and retrain + register only when the data version changed.

    python flows/retrain.py                  # one check now (ephemeral Prefect)
    python flows/retrain.py --force          # retrain even if the data did not change
    python flows/retrain.py --serve --cron "0 3 * * *"   # a deployment on a running Prefect server

The data version is the content hash the ingest stage computes over items, media
and features; it is compared with the ``data_version`` tag of the newest registered
model version.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import one_line_flow_errors, run_stages, stage_task  # noqa: E402  (sets Prefect/MLflow env defaults)
from prefect import flow, task  # noqa: E402

from cmr.check import check_settings  # noqa: E402
from cmr.cli import STAGES  # noqa: E402
from cmr.config import load_params  # noqa: E402


@task(name="registered-data-version")
def registered_data_version(uri: str, model_name: str) -> str | None:
    """data_version tag of the newest registered version, or None when nothing is registered."""
    from cmr.tracking.mlflow_log import latest_data_version

    return latest_data_version(uri, model_name)


@flow(name="cmr-retrain", log_prints=True)
def retrain(params_path: str = "params.yaml", force: bool = False) -> dict:
    p = load_params(params_path)
    check_settings(p)  # every setting and the source, before ingest replaces the prepared data
    info = stage_task("ingest")(p)
    current = info["data_version"]
    previous = registered_data_version(p.tracking.uri, p.register.model_name)
    if previous == current and not force:
        print(f"data version {current} is already registered: nothing to retrain")
        return {"retrained": False, "data_version": current}
    print(f"data version {previous} -> {current}: retraining")
    results = run_stages(p, STAGES[1:])
    return {"retrained": True, "data_version": current, "register": results["register"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--serve", action="store_true", help="serve a cron deployment (needs PREFECT_API_URL)")
    ap.add_argument("--cron", default="0 3 * * *")
    ap.add_argument("--name", default="cmr-retrain-nightly")
    a = ap.parse_args(argv)
    if a.serve and not os.environ.get("PREFECT_API_URL"):
        # an ephemeral server has no scheduler: the deployment would never run
        print("retrain.py: error: --serve needs a running Prefect server: `prefect server start`, then "
              "PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
        return 2

    def run() -> None:
        if a.serve:
            # pause_on_shutdown=False: stopping this process must not silently pause the schedule
            retrain.serve(name=a.name, cron=a.cron, parameters={"params_path": a.params}, pause_on_shutdown=False)
        else:
            print(retrain(a.params, a.force))

    try:
        return one_line_flow_errors("retrain.py", run)
    except KeyboardInterrupt:  # Ctrl-C while starting up: stop, in one line
        print("retrain.py: stopped (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
