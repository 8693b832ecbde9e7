"""A study in MLflow: one parent run, one nested run per cell (params + metrics), artifacts on the parent."""
from __future__ import annotations

from pathlib import Path

import mlflow

from cmr.tracking.mlflow_log import configure, flatten, metric_key
from cmr.tracking.provenance import git_commit


def log_study(*, uri: str, experiment: str, study: str, cells: list[dict], artifacts: list[str | Path],
              params: dict | None = None, tags: dict | None = None) -> str:
    """Log ``cells`` (each ``{"params": {...}, "metrics": {...}}``) under one parent run; return its id.

    Metric names are made MLflow-safe (``R@1`` -> ``R_at_1``); the parent carries the
    git commit and any ``tags`` (e.g. the data version of every dataset in the study).
    """
    exp_id = configure(uri, experiment)
    commit, dirty = git_commit()
    base_tags = {"study": study, "git_commit": commit, "git_dirty": str(dirty), **(tags or {})}
    with mlflow.start_run(experiment_id=exp_id, run_name=f"study:{study}", tags=base_tags) as parent:
        if params:
            mlflow.log_params({k: str(v)[:5000] for k, v in flatten(params).items()})
        for i, cell in enumerate(cells):
            name = cell.get("name") or f"{study}-{i}"
            with mlflow.start_run(experiment_id=exp_id, run_name=name, nested=True, tags=base_tags):
                mlflow.log_params({k: str(v)[:5000] for k, v in flatten(cell.get("params", {})).items()})
                mlflow.log_metrics({metric_key(k): float(v) for k, v in flatten(cell.get("metrics", {})).items()
                                    if isinstance(v, (int, float))})
        for path in artifacts:
            p = Path(path)
            if p.is_dir():
                mlflow.log_artifacts(str(p), artifact_path=p.name)
            elif p.exists():
                mlflow.log_artifact(str(p))
        return parent.info.run_id
