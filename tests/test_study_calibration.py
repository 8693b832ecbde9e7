"""The calibration study: the estimated Sinkhorn marginal and the option grid (fast, on real gcompris
texts), and the --quick run on real data: its files, its MLflow runs, and honest selection (slow)."""
import csv

import mlflow
import pytest
import torch

from cmr.config import load_params
from cmr.data.prepare import prepare_dataset
from cmr.retrieval.calibrate import expected_texts_per_image
from cmr.studies.calibration import CALIBRATORS, LOSSES, SETTINGS
from cmr.studies.calibration_cells import temperature_grid


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

    for name in ("table.csv", "table.md", "target.md", "r_at_1.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    datasets = {r["dataset"] for r in rows}
    assert datasets == {"openclipart_mini", "gcompris"}
    # the transductive block has every calibrator but 'none' (which needs no bank) and 'sinkhorn_dual'
    # (the test queries' own gallery is the gallery)
    per_loss = len(CALIBRATORS) + len(CALIBRATORS) - 2
    assert len(rows) == len(datasets) * len(LOSSES) * per_loss
    assert {r["setting"] for r in rows} == set(SETTINGS)
    assert {r["calibrator"] for r in rows if r["setting"] == "transductive"} == set(CALIBRATORS) - {"none",
                                                                                                 "sinkhorn_dual"}
    assert (out / "table.md").read_text().count("\n") == len(rows) + 2

    # 'none' is always a candidate, so a calibrator's pick can only be 'none' or its own method.
    for r in rows:
        own = "sinkhorn" if r["calibrator"].startswith("sinkhorn") else r["calibrator"]
        assert r["runs"] == "1"  # --quick: one split, one seed
        for direction in r["chosen"].split("; "):
            for pick in direction.split(" ", 1)[1].split(", "):
                assert pick.split()[0] in ("none", own), r
        if r["calibrator"] == "none":
            assert r["chosen"] == "t2i none 1/1; i2t none 1/1"
            assert float(r["Δ t2i/R@1"]) == float(r["Δ i2t/R@1"]) == 0.0
        # the paired difference is the difference of the means (one seed here)
        assert float(r["Δ t2i/R@1"]) == pytest.approx(
            float(r["t2i/R@1"]) - next(float(x["t2i/R@1"]) for x in rows if x["dataset"] == r["dataset"]
                                      and x["loss"] == r["loss"] and x["calibrator"] == "none"), abs=1e-9)

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["study-test"], output_format="list")
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    assert [x.info.run_id for x in parents] == [result["run_id"]]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == result["run_id"]]
    assert len(children) == result["cells"] == len(rows)  # one seed in --quick
    # i2t: each text has one image, so both query-bank Sinkhorn variants use the same (uniform)
    # marginal: the same choice on validation gives the same test R@1
    by_cell = {(c.data.params["dataset"], c.data.params["loss"], c.data.params["setting"],
                c.data.params["calibrator"]): c for c in children}
    for (dataset, loss, setting, cal), c in by_cell.items():
        if cal == "sinkhorn":
            twin = by_cell[dataset, loss, setting, "sinkhorn_uniform"]
            sfx = "_at_transductive" if setting == "transductive" else ""
            def i2t_choice(run):
                return {k: v for k, v in run.data.params.items() if k.startswith("chosen/i2t/")}

            assert i2t_choice(c)["chosen/i2t/method"] in ("none", "sinkhorn")
            if i2t_choice(c) == i2t_choice(twin):
                assert c.data.metrics[f"i2t/R_at_1{sfx}"] == twin.data.metrics[f"i2t/R_at_1{sfx}"]
    for c in children:
        # "@transductive" in MLflow-safe spelling
        suffix = "_at_transductive" if c.data.params["setting"] == "transductive" else ""
        assert {f"t2i/R_at_1{suffix}", f"i2t/R_at_10{suffix}", f"rsum{suffix}"} <= set(c.data.metrics), c.info.run_name
    assert {"data_version.openclipart_mini", "data_version.gcompris"} <= set(parents[0].data.tags)


def test_target_check_pairs_each_sinkhorn_with_every_rival_on_the_same_heads():
    from cmr.studies.calibration import target_check, target_markdown

    def cell(cal, setting, seed, t2i, i2t):
        sfx = "@transductive" if setting == "transductive" else ""
        return {"params": {"dataset": "d", "loss": "infonce", "split_seed": 0, "seed": seed, "setting": setting,
                           "calibrator": cal}, "metrics": {f"t2i/R@1{sfx}": t2i, f"i2t/R@1{sfx}": i2t}}

    r1 = {  # (calibrator, setting) -> per seed (t2i, i2t) R@1
        ("none", "inductive"): [(0.10, 0.20), (0.30, 0.20)],
        ("dsl", "inductive"): [(0.12, 0.25), (0.30, 0.22)],
        ("qbnorm", "inductive"): [(0.11, 0.21), (0.33, 0.23)],
        ("sinkhorn", "inductive"): [(0.12, 0.20), (0.31, 0.20)],
        ("sinkhorn_dual", "inductive"): [(0.13, 0.26), (0.32, 0.24)],
        ("dsl", "transductive"): [(0.15, 0.20), (0.30, 0.20)],
        ("qbnorm", "transductive"): [(0.10, 0.20), (0.30, 0.20)],
        ("sinkhorn", "transductive"): [(0.14, 0.21), (0.31, 0.21)],
    }
    cells = [cell(c, s, seed, *v) for (c, s), vals in r1.items() for seed, v in enumerate(vals)]
    rows = {(r["setting"], r["direction"], r["calibrator"]): r for r in target_check(cells)}
    assert set(rows) == {("inductive", d, c) for d in ("t2i", "i2t") for c in ("sinkhorn", "sinkhorn_dual")} | {
        ("transductive", d, "sinkhorn") for d in ("t2i", "i2t")}
    dual = rows["inductive", "t2i", "sinkhorn_dual"]
    assert dual["runs"] == 2
    assert dual["vs dsl"] == pytest.approx(100 * ((0.13 - 0.12) + (0.32 - 0.30)) / 2)
    assert dual["vs qbnorm"] == pytest.approx(100 * ((0.13 - 0.11) + (0.32 - 0.33)) / 2)
    assert dual["vs none"] == pytest.approx(100 * ((0.13 - 0.10) + (0.32 - 0.30)) / 2)
    diffs = [100 * (0.13 - 0.11), 100 * (0.32 - 0.33)]
    assert dual["vs qbnorm se"] == pytest.approx(abs(diffs[0] - diffs[1]) / 2)  # stdev / sqrt(2) of two values
    assert dual["met"]
    assert not rows["inductive", "i2t", "sinkhorn"]["met"]  # below DSL and QB-Norm
    # DSL: diffs -5, -2 points, mean -3.5, se 1.5 -> clearly below; QB-Norm: -1, -3, mean -2, se 1 -> -2 + 2 se = 0
    assert rows["inductive", "i2t", "sinkhorn"]["clearly below"] == ["dsl"]
    assert dual["clearly below"] == []
    # transductive rows are paired with the transductive rivals, and 'none' is the inductive cell
    tr = rows["transductive", "t2i", "sinkhorn"]
    assert tr["vs dsl"] == pytest.approx(100 * ((0.14 - 0.15) + (0.31 - 0.30)) / 2)
    assert tr["vs none"] == pytest.approx(100 * ((0.14 - 0.10) + (0.31 - 0.30)) / 2)
    text = target_markdown(list(rows.values()))
    met = sum(r["met"] for r in rows.values())
    assert text.endswith(f"met in {met} of 6 rows; clearly below a rival in 1 of 6 rows\n")
    assert "| d | infonce | inductive | i2t | sinkhorn | 1 x 2 | -3.50 ± 1.50 | -2.00 ± 1.00 | +0.00 ± 0.00 | no | dsl |" in text


def test_target_check_pairs_within_a_split_and_takes_the_standard_error_over_splits():
    """Two splits x two seeds with the same seed numbers: pairing must key on the split too, and the
    seeds of a split (one shared test set) count as one observation for the standard error."""
    from cmr.studies.calibration import target_check

    r1 = {  # (split, seed) -> calibrator -> t2i R@1
        (0, 0): {"none": 0.10, "dsl": 0.12, "qbnorm": 0.12, "sinkhorn": 0.13},
        (0, 1): {"none": 0.20, "dsl": 0.20, "qbnorm": 0.21, "sinkhorn": 0.23},
        (1, 0): {"none": 0.40, "dsl": 0.45, "qbnorm": 0.44, "sinkhorn": 0.44},
        (1, 1): {"none": 0.30, "dsl": 0.33, "qbnorm": 0.30, "sinkhorn": 0.32},
    }
    cells = [{"params": {"dataset": "d", "loss": "ncl", "split_seed": split, "seed": seed, "setting": "inductive",
                         "calibrator": cal}, "metrics": {"t2i/R@1": v, "i2t/R@1": v}}
             for (split, seed), cals in r1.items() for cal, v in cals.items()]
    row = next(r for r in target_check(cells) if r["direction"] == "t2i" and r["calibrator"] == "sinkhorn")
    assert (row["splits"], row["runs"]) == (2, 4)
    split_means = [100 * ((0.13 - 0.12) + (0.23 - 0.20)) / 2, 100 * ((0.44 - 0.45) + (0.32 - 0.33)) / 2]
    assert row["vs dsl"] == pytest.approx(sum(split_means) / 2)
    assert row["vs dsl se"] == pytest.approx(abs(split_means[0] - split_means[1]) / 2)
    assert row["vs none"] == pytest.approx(100 * (0.03 + 0.03 + 0.04 + 0.02) / 4)
    assert row["met"] is True  # ahead of DSL on split 0 by more than it trails on split 1
    assert row["clearly below"] == []


def test_resplit_gives_each_split_the_features_of_its_own_items(shared_datasets):
    """Features pooled from split 0 and re-split for another split seed equal features computed from
    that split's items directly (real gcompris items: 1-3 texts each; features a hash of id and text)."""
    import zlib

    from cmr.data.schema import by_split
    from cmr.studies.calibration import SPLITS, pooled_features, resplit
    from cmr.training.features import FeatureSet, label_matrix, texts_of

    def vec(key: str) -> torch.Tensor:
        return torch.randn(4, generator=torch.Generator().manual_seed(zlib.crc32(key.encode())))

    def direct(items, label_set) -> FeatureSet:
        texts, owner = texts_of(items)
        return FeatureSet(torch.stack([vec(it.id) for it in items]),
                          torch.stack([vec(items[int(o)].id + "|" + t) for t, o in zip(texts, owner)]), owner,
                          label_matrix(items, label_set), None)

    base = prepare_dataset("gcompris", shared_datasets / "gcompris", {}, 0.1, 0.15, 0)
    other = prepare_dataset("gcompris", shared_datasets / "gcompris", {}, 0.1, 0.15, 3)
    pool, row_of = pooled_features(base, {s: direct(by_split(base.items, s), base.label_set) for s in SPLITS})
    got = resplit(pool, row_of, other)
    moved = 0
    for s in SPLITS:
        items = by_split(other.items, s)
        want = direct(items, other.label_set)
        moved += sum(it.id not in {x.id for x in by_split(base.items, s)} for it in items)
        assert torch.equal(got[s].image, want.image)
        pairs = lambda fs: sorted((int(o), tuple(t.tolist())) for t, o in zip(fs.text, fs.text_item))  # noqa: E731
        assert pairs(got[s]) == pairs(want)
        if want.labels is not None:
            assert torch.equal(got[s].labels, want.labels)
    assert moved > 0  # the other split seed really moved items between splits


def test_summarise_pairs_each_calibrator_with_none_of_the_same_split_and_seed():
    """Δ vs none is taken on the same heads: cells of two splits with equal seed numbers must not mix."""
    from cmr.studies.calibration import summarise

    def cell(cal, split, seed, r1):
        metrics = {f"{d}/R@{k}": r1 for d in ("t2i", "i2t") for k in (1, 5, 10)}
        return {"params": {"dataset": "d", "loss": "infonce", "split_seed": split, "seed": seed,
                           "setting": "inductive", "calibrator": cal,
                           "chosen": {"t2i": {"method": cal, "options": {}}, "i2t": {"method": cal, "options": {}}}},
                "metrics": {**metrics, "rsum": 600 * r1}}

    cells = [cell("none", 0, 0, 0.10), cell("dsl", 0, 0, 0.12), cell("none", 1, 0, 0.40), cell("dsl", 1, 0, 0.41),
             cell("none", 0, 1, 0.20), cell("dsl", 0, 1, 0.24), cell("none", 1, 1, 0.30), cell("dsl", 1, 1, 0.30)]
    row = next(r for r in summarise(cells) if r["calibrator"] == "dsl")
    assert row["runs"] == 4
    assert row["Δ t2i/R@1"] == pytest.approx(100 * (0.02 + 0.01 + 0.04 + 0.0) / 4)
    split_means = [100 * (0.02 + 0.04) / 2, 100 * (0.01 + 0.0) / 2]
    assert row["Δ t2i/R@1 se"] == pytest.approx(abs(split_means[0] - split_means[1]) / 2)
    assert row["chosen"] == "t2i dsl 4/4; i2t dsl 4/4"
