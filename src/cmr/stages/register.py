"""Stage register: log this pipeline execution to MLflow and register the model.

The ``champion`` alias moves only if the new model beats the current champion on
the validation metric (see :mod:`cmr.tracking.mlflow_log`). The run is named after the
settings that differ from the committed ``params.yaml`` (and the DVC experiment, if any);
the registered copy of the model references locked offline towers instead of storing
them (:mod:`cmr.tracking.model_package`).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from cmr.config import Params
from cmr.data.prepare import load_prepared
from cmr.io import read_json, write_json
from cmr.retrieval.evaluation import in_percent
from cmr.stages._common import log, resolve_device, stage_main
from cmr.tracking.provenance import dvc_dep_hash, git_commit



def rescore_on_val(p: Params, model_uri: str, device: str) -> float:
    """Validation ``register.metric`` (percent, as the metrics file has it) of a registered model on the
    current data, by the architecture's own validation (:mod:`cmr.stages._methods`)."""
    import mlflow

    from cmr.stages._methods import method_for

    local = Path(mlflow.artifacts.download_artifacts(model_uri))
    specs = sorted(local.rglob("spec.json"))  # the pyfunc keeps the model folder as an artifact
    model_dir = specs[0].parent if specs else local
    metrics = in_percent(method_for(p.model.arch).validate(p, str(model_dir), device))
    return metrics[p.register.metric.removeprefix("val/")]


def tracking_uri(uri: str) -> str:
    """``uri`` with a relative SQLite path taken from the DVC project root when DVC runs the stage:
    a queued experiment runs in a temporary copy, and its run belongs in the project's store."""
    root = os.environ.get("DVC_ROOT")
    if root and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_absolute():
        return f"sqlite:///{Path(root) / uri.removeprefix('sqlite:///')}"
    return uri


def committed_params(path: str = "params.yaml") -> dict:
    """``params.yaml`` as committed at git HEAD ({} outside git or when it is not committed)."""
    out = subprocess.run(["git", "show", f"HEAD:{path}"], capture_output=True, text=True)
    return (yaml.safe_load(out.stdout) or {}) if out.returncode == 0 else {}


def run_name(settings: dict, baseline: dict, commit: str, experiment: str | None = None, limit: int = 120) -> str:
    """The settings that differ from ``baseline`` (e.g. ``finetune.epochs=4 calibrate.method=none``),
    or ``params.yaml``; prefixed by the DVC experiment's name, suffixed by the commit."""
    from cmr.tracking.mlflow_log import flatten

    base = flatten(baseline, "")
    what = " ".join(f"{k.replace('/', '.')}={v}" for k, v in flatten(settings, "").items()
                    if k in base and base[k] != v) or "params.yaml"
    if len(what) > limit:
        what = what[:limit - 1] + "…"
    return f"{experiment + ': ' if experiment else ''}{what} @{commit[:8]}"


def run(p: Params) -> dict:
    paths = p.paths
    metrics = read_json(paths.metrics)
    prepared_info = load_prepared(paths.prepared).info
    commit, dirty = git_commit()
    tags = {"git_commit": commit, "git_dirty": str(dirty), "data_version": prepared_info["data_version"],
            "dataset": p.data.reader, "dvc_data_md5": dvc_dep_hash("dvc.lock", "ingest", p.data.source) or "none (not run by dvc repro)",
            "calibration": p.calibrate.method, "query_bank": p.calibrate.query_bank,
            # validation scores are comparable only under the same evaluation settings
            "eval_settings": f"{p.evaluate.level} ks={list(p.evaluate.ks)} percent"}
    calibration = read_json(Path(paths.calibration) / "calibration.json")
    for direction, choice in calibration.get("chosen", {}).items():
        tags[f"calibration_chosen_{direction}"] = f"{choice['method']} {choice['options']}"
    histories = {s: [in_percent(row) for row in read_json(Path(d) / "history.json")] for s, d in
                 (("pretrain", paths.pretrained), ("finetune", paths.finetuned)) if (Path(d) / "history.json").exists()}
    device = resolve_device(p.device)
    from cmr.tracking.mlflow_log import log_pipeline_run
    from cmr.stages._methods import method_for

    settings = p.model_dump(mode="json")
    with tempfile.TemporaryDirectory() as tmp:
        # the settings in effect (any --params file, any --set), not whatever params.yaml holds
        effective = Path(tmp) / "params.yaml"
        effective.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
        package = method_for(p.model.arch).package(str(Path(paths.finetuned) / "model"), str(Path(tmp) / "model"))
        tags["registered_towers"] = package["towers"]
        log(f"register: model package {package['bytes'] / 1e6:.1f} MB (towers {package['towers']})")
        out = log_pipeline_run(
            uri=tracking_uri(p.tracking.uri), experiment=p.tracking.experiment,
            run_name=run_name(settings, committed_params(), commit, os.environ.get("DVC_EXP_NAME")),
            params=settings, metrics=metrics, histories=histories,
            # the pre-training run's own figure (cmmixer: original / mixed / masked / reconstructed)
            artifacts={"validation": paths.validation, "plots": paths.plots, "metrics": paths.metrics,
                       "pretrain_figure": str(Path(paths.pretrained) / "reconstruction.png"),
                       "calibration": str(Path(paths.calibration) / "calibration.json"), "params": str(effective),
                       "dvc": "dvc.lock"},
            model_dir=str(Path(tmp) / "model"), tags=tags, model_name=p.register.model_name, alias=p.register.alias,
            select_metric=p.register.metric,
            rescore=lambda uri: rescore_on_val(p, uri, device),
            pip_requirements=method_for(p.model.arch).requirements(p.model.arch), log=log,
        )
    write_json(paths.registry, out)
    log(f"register: {out['decision']} (run {out['run_id']})")
    return out


def from_params(p: Params):
    return run(p)


def main(argv=None) -> int:
    return stage_main("register", from_params, argv)


if __name__ == "__main__":
    sys.exit(main())
