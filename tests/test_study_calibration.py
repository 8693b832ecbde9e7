"""The calibration study's --quick run on real data: its files, its MLflow runs, and honest selection."""
import csv

import mlflow
import pytest

from cmr.config import load_params
from cmr.studies.calibration import CALIBRATORS, LOSSES


@pytest.mark.slow  # trains 4 pairs of heads and builds the towers twice: about 1-2 minutes on 2 cores
def test_quick_study_writes_table_plot_and_one_parent_run(tmp_path, repo_root, shared_datasets, monkeypatch):
    from cmr.studies.calibration import run

    monkeypatch.chdir(repo_root)  # params.yaml paths (embedded dataset, feature cache) are repo-relative
    monkeypatch.setenv("CMR_SHARED_DATASETS", str(shared_datasets))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = load_params(repo_root / "params.yaml", {"tracking": {"uri": uri, "experiment": "study-test"}})
    out = tmp_path / "study"
    result = run(p, quick=True, out_dir=out)

    for name in ("table.csv", "table.md", "r_at_1.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    datasets = {r["dataset"] for r in rows}
    assert datasets == {"openclipart_mini", "gcompris"}
    assert len(rows) == len(datasets) * len(LOSSES) * len(CALIBRATORS)
    assert (out / "table.md").read_text().count("\n") == len(rows) + 2

    # 'none' is always a candidate, so a calibrator's pick can only be 'none' or itself.
    for r in rows:
        for part in r["chosen"].split():
            method = part.split(":")[1].split("(")[0]
            assert method in ("none", r["calibrator"]), r
        if r["calibrator"] == "none":
            assert r["chosen"] == "t2i:none i2t:none"

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["study-test"], output_format="list")
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    assert [x.info.run_id for x in parents] == [result["run_id"]]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == result["run_id"]]
    assert len(children) == result["cells"] == len(rows)  # one seed in --quick
    assert all({"t2i/R_at_1", "i2t/R_at_10", "rsum"} <= set(c.data.metrics) for c in children)
    assert {"data_version.openclipart_mini", "data_version.gcompris"} <= set(parents[0].data.tags)
