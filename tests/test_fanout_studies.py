"""Studies on the Dask task runner (a 2-process LocalCluster) give the sequential runner's table, and
MLflow holds one parent run a study run with one nested run a cell (real data, --quick sizes); the
heads a cell ships instead of the model."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from cmr.config import load_params


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def one_thread():
    """The driver on one thread, as distributed starts its workers (OMP_NUM_THREADS=1): with another
    thread count a float reduction may round differently and move a rank."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _both_runners(study, address: str, repo_root: Path, tmp_path: Path, monkeypatch) -> dict[str, dict]:
    """``study(p, quick=True, out_dir=...)`` once per runner; the Dask run with stderr a terminal."""
    monkeypatch.chdir(repo_root)  # params.yaml paths (embedded dataset, feature cache) are repo-relative
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = {}
    for label, runner in (("sequential", "sequential"), ("dask", f"dask:{address}")):
        tty = _Terminal()
        p = load_params(repo_root / "params.yaml", {"tracking": {"uri": uri, "experiment": "fanout-test"},
                                                    "task_runner": runner})
        with monkeypatch.context() as patch:
            if label == "dask":
                patch.setattr("sys.stderr", tty)
            result = study(p, quick=True, out_dir=tmp_path / label)
        out[label] = {"result": result, "table": (tmp_path / label / "table.csv").read_text(), "bar": tty.getvalue()}
    return out | {"uri": uri}


def _parents_and_children(uri: str) -> dict[str, list]:
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["fanout-test"], output_format="list")
    parents = {r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags}
    return {parent: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent] for parent in parents}


@pytest.mark.slow  # two quick studies (the towers built twice, features from the cache): ~1-2 min on 2 cores
def test_generalisation_on_dask_gives_the_sequential_table(dask_cluster, one_thread, repo_root, shared_datasets,
                                                           tmp_path, monkeypatch):
    from cmr.studies.generalisation import run

    monkeypatch.setenv("CMR_SHARED_DATASETS", str(shared_datasets))
    runs = _both_runners(run, dask_cluster.scheduler_address, repo_root, tmp_path, monkeypatch)
    seq, dask = runs["sequential"], runs["dask"]
    assert [r["train set"] for r in seq["result"]["rows"]] == ["none (initial heads)", "openclipart_mini", "gcompris"]
    assert dask["table"] == seq["table"]
    assert dask["result"]["rows"] == seq["result"]["rows"]
    # the bar counted the 2 trained rows as they finished
    assert "generalisation" in dask["bar"] and "0/2" in dask["bar"] and "1/2" in dask["bar"]
    children = _parents_and_children(runs["uri"])
    assert set(children) == {seq["result"]["run_id"], dask["result"]["run_id"]}
    for parent, kids in children.items():
        assert sorted(r.info.run_name for r in kids) == sorted(r["train set"] for r in seq["result"]["rows"])


@pytest.mark.slow  # two quick studies, 2 datasets x 2 losses of heads each: ~2-3 min on 2 cores
def test_calibration_on_dask_gives_the_sequential_table(dask_cluster, one_thread, repo_root, shared_datasets,
                                                        tmp_path, monkeypatch):
    from cmr.studies.calibration import run

    monkeypatch.setenv("CMR_SHARED_DATASETS", str(shared_datasets))
    runs = _both_runners(run, dask_cluster.scheduler_address, repo_root, tmp_path, monkeypatch)
    seq, dask = runs["sequential"], runs["dask"]
    assert dask["table"] == seq["table"]
    assert (tmp_path / "dask" / "target.md").read_text() == (tmp_path / "sequential" / "target.md").read_text()
    assert "calibration" in dask["bar"] and "0/2" in dask["bar"]  # one cell a dataset split: 2 with --quick
    children = _parents_and_children(runs["uri"])
    assert set(children) == {seq["result"]["run_id"], dask["result"]["run_id"]}
    names = {parent: sorted(r.info.run_name for r in kids) for parent, kids in children.items()}
    assert len(names[seq["result"]["run_id"]]) == seq["result"]["cells"]
    assert names[seq["result"]["run_id"]] == names[dask["result"]["run_id"]]
    assert len(set(names[dask["result"]["run_id"]])) == dask["result"]["cells"]  # no duplicates


def test_two_tower_heads_embed_as_the_model_and_are_copies_small_enough_to_ship(lite0):
    import pickle

    from cmr.studies._common import TwoTowerHeads

    model = lite0.model.eval()
    heads = TwoTowerHeads(model).eval()
    image = torch.randn(3, model.backbone_image_dim, generator=torch.Generator().manual_seed(0))
    text = torch.randn(4, model.backbone_text_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(heads.head_image(image), model.head_image(image))
        assert torch.equal(heads.head_text(text), model.head_text(text))
        assert heads.head_image(image).shape == (3, model.embed_dim) and heads.embed_dim == model.embed_dim
        assert heads.logit_scale.item() == model.logit_scale.item()
        before = model.head_image(image)
        for p in heads.parameters():
            p.add_(0.5)  # training the copy leaves the model as it was
        assert torch.equal(model.head_image(image), before) and heads.logit_scale.item() != model.logit_scale.item()
    # what a study cell ships to a worker: the heads, not the ~100 MB of towers
    assert len(pickle.dumps(heads)) < 0.05 * len(pickle.dumps(model))
