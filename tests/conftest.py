"""Shared fixtures. Real data comes from ../shared/datasets (override: CMR_SHARED_DATASETS)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

for _k, _v in {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
               "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data" / "raw" / "openclipart_mini"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    root = Path(os.environ.get("CMR_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))
    if not root.exists():
        pytest.skip(f"real test data not found at {root} (set CMR_SHARED_DATASETS)")
    return root


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="module")
def lite0():
    """The offline two-tower model (embed dim 64), one per test module: tests may lock or quantise it."""
    import torch

    from cmr.models import build_two_tower

    torch.manual_seed(0)
    return build_two_tower("lite0-minilm", embed_dim=64)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """A Prefect API and a 2-process LocalCluster whose workers report to it (``cmr.studies.fanout``)."""
    from distributed import LocalCluster

    from cmr.studies.fanout import prefect_api_for_workers

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect"))
    with prefect_api_for_workers():
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as local:
            yield local
