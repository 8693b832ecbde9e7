"""One MLflow run per pipeline execution; model registration and the champion alias.

The run gets the params, every metric of the DVC metrics file, the training
histories as nested runs (one per training stage, metrics per epoch), the
validation report, plots and calibration as artifacts, and provenance tags (git
commit, data version, DVC hash). The alias moves only when the new model beats the
champion on the validation metric *measured on the same validation data*; if the
data changed since the champion was registered, the champion is re-scored on the
current validation split first. The run says why the alias did or did not move.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from cmr.errors import CmrError, ConfigError  # noqa: E402
from cmr.retrieval.metrics import require_higher_is_better  # noqa: E402
from cmr.tracking.locks import registry_lock, store_init_lock  # noqa: E402
from cmr.tracking.pyfunc import MODEL_CODE  # noqa: E402


def metric_key(name: str) -> str:
    """MLflow metric names allow letters, digits, _ - . / and space: 'R@1' becomes 'R_at_1'."""
    return re.sub(r"[^\w\-./ ]", "_", name.replace("@", "_at_"))


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def _open_store() -> MlflowClient:
    """Open the tracking and the registry store (the first open of an empty database migrates it)."""
    client = MlflowClient()  # opens the tracking store
    client.search_experiments(max_results=1)
    client.search_registered_models(max_results=1)
    return client


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: ``artifacts/`` beside a SQLite store (``mlruns/``
    for another database); None for a tracking server, whose own artifact root serves them to
    every machine (a local path would be the path on whichever machine created the experiment)."""
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    root = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else Path("mlruns")
    return (root.resolve() / "artifacts").as_uri()


def configure(uri: str, experiment: str, attempts: int = 5) -> str:
    """Point MLflow at ``uri`` (sqlite under mlruns/ by default); artifacts live beside it.

    Safe to call from several processes at once on a fresh store: a SQLite store is opened
    (and migrated) by one process at a time; elsewhere a migration collision is retried, and
    an experiment created by another process in between is used as it is.
    """
    mlflow.set_tracking_uri(uri)
    with store_init_lock(uri):
        for attempt in range(attempts):
            try:
                client = _open_store()
                break
            except Exception as e:  # sqlalchemy's OperationalError / IntegrityError of a concurrent migration
                if attempt == attempts - 1 or not re.search(r"duplicate|already exists", str(e), re.I):
                    raise
                time.sleep(0.5 * (attempt + 1))
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(experiment, artifact_location=artifact_location(uri))
        except MlflowException as e:
            if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
            return client.get_experiment_by_name(experiment).experiment_id


@dataclass
class Decision:
    moved: bool
    reason: str
    version: str
    previous: str | None


#: run tags that must match for a champion's logged validation score to be compared as it is
COMPARABLE_TAGS = ("data_version", "eval_settings")


def champion_score(client: MlflowClient, model_name: str, alias: str, metric: str, comparable: dict[str, str],
                   rescore: Callable[[str], float]) -> tuple[str | None, float | None, str]:
    """(champion version, its validation score on the current data, how that score was obtained).

    The champion's logged score is reused only when its run carries the same ``comparable``
    tags (data version, evaluation settings); otherwise, or when its run is gone, the
    registered model is re-scored on the current validation split.
    """
    try:
        mv = client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None, None, "no champion yet"
    try:
        run = client.get_run(mv.run_id)
    except MlflowException:
        run = None  # e.g. deleted and garbage-collected; the registered model files remain
    if (run is not None and all(run.data.tags.get(k) == v for k, v in comparable.items())
            and metric_key(metric) in run.data.metrics):
        return str(mv.version), run.data.metrics[metric_key(metric)], f"logged with the same {', '.join(comparable)}"
    try:
        score = rescore(f"models:/{model_name}/{mv.version}")
    except (MlflowException, OSError, CmrError) as e:
        raise CmrError(f"champion v{mv.version} of {model_name!r} (alias {alias!r}) cannot be re-scored: "
                       f"{str(e).splitlines()[0]}; restore its files or move the alias") from None
    return str(mv.version), score, "re-scored on the current validation split"


def decide(version: str, new_score: float, prev: str | None, prev_score: float | None, how: str,
           metric: str) -> Decision:
    """Move the alias to ``version`` when there is no champion or it scores strictly higher."""
    if prev is None:
        return Decision(True, f"moved to v{version}: {metric}={new_score:.4f} (no champion yet)", version, None)
    if new_score > prev_score:
        return Decision(True, f"moved to v{version}: {metric}={new_score:.4f} > champion v{prev}'s "
                              f"{prev_score:.4f} ({how})", version, prev)
    return Decision(False, f"kept v{prev}: new v{version} {metric}={new_score:.4f} <= champion's "
                           f"{prev_score:.4f} ({how})", version, prev)


def log_pipeline_run(*, uri: str, experiment: str, run_name: str, params: dict, metrics: dict,
                     histories: dict[str, list[dict]], artifacts: dict[str, str], model_dir: str,
                     tags: dict[str, str], model_name: str, alias: str, select_metric: str,
                     rescore: Callable[[str], float], pip_requirements: list[str],
                     log: Callable[[str], None] = lambda msg: None) -> dict:
    flat = flatten(metrics)
    if select_metric not in flat:
        raise ConfigError(f"register metric {select_metric!r} is not in the metrics; have "
                          f"{', '.join(k for k in sorted(flat) if k.startswith('val/'))}")
    require_higher_is_better(select_metric, "register metric")
    exp_id = configure(uri, experiment)
    client = MlflowClient()
    new_score = flat[select_metric]
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags) as run:
        mlflow.log_params({k: str(v)[:5000] for k, v in flatten(params, "").items()})
        mlflow.log_metrics({metric_key(k): float(v) for k, v in flat.items() if isinstance(v, (int, float))})
        for stage, history in histories.items():
            with mlflow.start_run(experiment_id=exp_id, run_name=stage, nested=True, tags=tags):
                for row in history:
                    mlflow.log_metrics({metric_key(k): float(v) for k, v in row.items()
                                        if k != "epoch" and isinstance(v, (int, float))}, step=int(row["epoch"]))
        for name, path in artifacts.items():
            p = Path(path)
            if p.is_dir():
                mlflow.log_artifacts(str(p), artifact_path=name)
            elif p.exists():
                mlflow.log_artifact(str(p), artifact_path=name)
        info = mlflow.pyfunc.log_model(name="model", python_model=MODEL_CODE, artifacts={"model_dir": str(model_dir)},
                                       pip_requirements=pip_requirements)
        # read the champion, decide, register and move the alias as one step per registered
        # model: a concurrent registration waits here, then sees this one's outcome
        with registry_lock(client, model_name, log=log):
            # the champion's score first: a failure there must not leave a registered version behind
            prev, prev_score, how = champion_score(client, model_name, alias, select_metric,
                                                   {k: tags.get(k, "") for k in COMPARABLE_TAGS}, rescore)
            version = str(mlflow.register_model(info.model_uri, model_name).version)
            decision = decide(version, new_score, prev, prev_score, how, select_metric)
            try:
                mlflow.set_tag("champion_decision", decision.reason)
                client.set_model_version_tag(model_name, version, "champion_decision", decision.reason)
                if decision.moved:  # last: until here the old champion keeps its alias
                    client.set_registered_model_alias(model_name, alias, version)
            except Exception:
                client.delete_model_version(model_name, version)  # no half-registered version
                raise
        return {"run_id": run.info.run_id, "experiment_id": exp_id, "model_name": model_name, "version": version,
                "alias_moved": decision.moved, "decision": decision.reason, "previous_champion": decision.previous,
                select_metric: new_score}


def latest_data_version(uri: str, model_name: str) -> str | None:
    """``data_version`` tag of the run behind the newest registered version of ``model_name``."""
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name='{model_name}'")
    except MlflowException:
        return None
    for version in sorted(versions, key=lambda v: int(v.version), reverse=True):
        try:
            run = client.get_run(version.run_id)
        except MlflowException:
            continue  # its run is gone
        if run.info.status == "FINISHED":  # a version of a run that failed half-way does not count
            return run.data.tags.get("data_version")
    return None
