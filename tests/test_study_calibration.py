"""The calibration study: the estimated Sinkhorn marginal and the option grid (fast, on real gcompris
texts), and the --quick run on real data: its files, its MLflow runs, and honest selection (slow)."""
import csv

import mlflow
import pytest
import torch

from cmr.config import load_params
from cmr.data.prepare import prepare_dataset
from cmr.retrieval.calibrate import expected_texts_per_image
from cmr.studies.calibration import CALIBRATORS, LOSSES, SETTINGS, temperature_grid


def test_expected_texts_per_image_is_the_mean_count_of_the_nearest_training_images(shared_datasets):
    # real text counts of gcompris training images (1-3 texts each); gallery points placed by hand
    prepared = prepare_dataset("gcompris", shared_datasets / "gcompris", {}, 0.1, 0.15, 0)
    train = [it for it in prepared.items if it.split == "train"]
    counts = torch.tensor([len(it.texts) for it in train], dtype=torch.float64)
    assert {1.0, 2.0, 3.0} <= set(counts.tolist())
    text_item = torch.repeat_interleave(torch.arange(len(train)), counts.long())
    image = torch.eye(len(train))  # training image n is the unit vector e_n
    three, one = int(torch.nonzero(counts == 3)[0]), int(torch.nonzero(counts == 1)[0])
    gallery = torch.stack([image[three], image[one], torch.nn.functional.normalize(image[three] + image[one], dim=0)])
    # k = 1: the nearest training image's count; k = 2: the mean over the two nearest (every other image is at 0)
    assert expected_texts_per_image(image, text_item, gallery[:2], k=1).tolist() == [3.0, 1.0]
    assert expected_texts_per_image(image, text_item, gallery[2:], k=2).tolist() == [2.0]
    # an image far from all training images still gets at least one text
    far = -torch.ones(1, len(train)) / len(train) ** 0.5
    assert expected_texts_per_image(image, text_item, far, k=3).item() >= 1.0


def test_temperature_grid_is_one_scale_for_every_calibrator():
    assert temperature_grid("none", 0.07) == {}
    assert temperature_grid("sinkhorn", 0.07, (0.5, 1.0)) == {"epsilon": [0.035, 0.07]}
    assert temperature_grid("sinkhorn_uniform", 0.07, (1.0,)) == {"epsilon": [0.07]}
    assert temperature_grid("dsl", 0.07, (0.5, 1.0)) == {"temperature": [0.035, 0.07]}
    assert temperature_grid("qbnorm", 0.05, (0.5, 1.0)) == {"beta": [40.0, 20.0]}
    assert temperature_grid("inverted_softmax", 0.05, (2.0,)) == {"beta": [10.0]}


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
    # the transductive block has every calibrator but 'none' (which needs no bank)
    per_loss = len(CALIBRATORS) + len(CALIBRATORS) - 1
    assert len(rows) == len(datasets) * len(LOSSES) * per_loss
    assert {r["setting"] for r in rows} == set(SETTINGS)
    assert (out / "table.md").read_text().count("\n") == len(rows) + 2

    # 'none' is always a candidate, so a calibrator's pick can only be 'none' or its own method.
    for r in rows:
        own = "sinkhorn" if r["calibrator"].startswith("sinkhorn") else r["calibrator"]
        for part in r["chosen"].split():
            method = part.split(":")[1].split("(")[0]
            assert method in ("none", own), r
        if r["calibrator"] == "none":
            assert r["chosen"] == "t2i:none i2t:none"
            assert float(r["Δ t2i/R@1"]) == float(r["Δ i2t/R@1"]) == 0.0
        # the paired difference is the difference of the means (one seed here)
        assert float(r["Δ t2i/R@1"]) == pytest.approx(
            float(r["t2i/R@1"]) - next(float(x["t2i/R@1"]) for x in rows if x["dataset"] == r["dataset"]
                                      and x["loss"] == r["loss"] and x["calibrator"] == "none"), abs=1e-9)
        # i2t: each text has one image, so both Sinkhorn variants use the same (uniform) marginal
        if r["calibrator"] == "sinkhorn":
            twin = next(x for x in rows if x["calibrator"] == "sinkhorn_uniform"
                        and all(x[k] == r[k] for k in ("dataset", "loss", "setting")))
            if r["chosen"].split()[1] == twin["chosen"].split()[1]:
                assert r["i2t/R@1"] == twin["i2t/R@1"]

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["study-test"], output_format="list")
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    assert [x.info.run_id for x in parents] == [result["run_id"]]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == result["run_id"]]
    assert len(children) == result["cells"] == len(rows)  # one seed in --quick
    for c in children:
        # "@transductive" in MLflow-safe spelling
        suffix = "_at_transductive" if c.data.params["setting"] == "transductive" else ""
        assert {f"t2i/R_at_1{suffix}", f"i2t/R_at_10{suffix}", f"rsum{suffix}"} <= set(c.data.metrics), c.info.run_name
    assert {"data_version.openclipart_mini", "data_version.gcompris"} <= set(parents[0].data.tags)
