"""`cmr evaluate`: a saved model on another reader's dataset, without training; its bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cmr.cli import main
from cmr.data.readers import READERS
from cmr.models import save_two_tower
from cmr.retrieval.evaluation import evaluate_embeddings, in_percent
from cmr.training.features import decode_images

from test_readers import _make_coco


@pytest.fixture(scope="module")
def model_dir(lite0, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trained") / "finetune"
    save_two_tower(lite0.model, lite0.spec, folder / "model")
    return folder


@pytest.fixture()
def params(tmp_path, repo_root) -> str:
    p = yaml.safe_load((repo_root / "params.yaml").read_text())
    p["device"] = "cpu"
    p["paths"] = {k: str(tmp_path / "out" / Path(v).name) for k, v in p["paths"].items()}
    p["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    return str(tmp_path / "params.yaml")


def _val_only_coco(shared: Path, root: Path) -> Path:
    """A COCO folder with only captions_val2017.json: no train split, so ingest could not split it."""
    _make_coco(shared, root)
    (root / "annotations" / "captions_train2017.json").unlink()
    return root


def test_val_only_coco_folder_is_evaluated_whole_and_matches_a_direct_computation(
        lite0, model_dir, params, shared_datasets, tmp_path, capsys):
    source = _val_only_coco(shared_datasets, tmp_path / "coco")
    out = tmp_path / "eval"
    assert main(["--params", params, "evaluate", str(model_dir), "--reader", "coco", "--source", str(source),
                 "--out", str(out), "--no-mlflow"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in table[1:]] == ["test,", "test,"]  # uncalibrated and random; no validation row
    metrics = json.loads((out / "metrics.json").read_text())
    about = json.loads((out / "evaluation.json").read_text())
    assert about["split"] == "all" and about["reader"] == "coco"
    # the naive reference: embed the val2017 items directly with the model
    items = READERS.get("coco")(source).items
    model = lite0.model.eval()
    with torch.no_grad():
        img = model.encode_image(decode_images(source, [it.image for it in items], lite0.preprocess_val))
        texts = [t for it in items for t in it.texts]
        txt = model.encode_text(lite0.tokenizer(texts))
    owner = torch.tensor([i for i, it in enumerate(items) for _ in it.texts])
    expected = in_percent(evaluate_embeddings(img, txt, owner))  # the metrics file is in percent
    assert metrics["counts"] == {"test_items": len(items), "test_texts": len(texts)}
    for key in ("t2i/R@1", "i2t/R@5", "t2i/MdR", "rsum"):
        assert metrics["test"]["none"][key] == pytest.approx(expected[key], abs=1e-6)
    header = (out / "plots" / "recall_at_k.csv").read_text().splitlines()[0]
    assert header == "k,t2i_none,i2t_none"


def test_test_split_is_used_when_the_source_has_one(model_dir, params, shared_datasets, tmp_path):
    source = _make_coco(shared_datasets, tmp_path / "coco")
    with pytest.raises(SystemExit):  # argparse: --split must be one of the choices
        main(["--params", params, "evaluate", str(model_dir), "--reader", "coco", "--source", str(source),
              "--split", "val"])
    assert main(["--params", params, "evaluate", str(model_dir), "--reader", "coco", "--source", str(source),
                 "--split", "test", "--no-mlflow"]) == 2  # coco train2017/val2017: no test split


def test_bad_input_is_a_one_line_error(model_dir, params, shared_datasets, tmp_path, capsys):
    coco = _val_only_coco(shared_datasets, tmp_path / "coco")
    cases = [
        ([str(tmp_path / "no-model"), "--reader", "coco", "--source", str(coco)], "no model there"),
        ([str(model_dir), "--reader", "features_npz", "--source", str(shared_datasets / "wikipedia_cmr")],
         "breaks rule 'image-text items (the model embeds images and texts)'"),
        ([str(model_dir), "--reader", "no_such_reader", "--source", str(coco)], "--reader"),
    ]
    for args, message in cases:
        assert main(["--params", params, "evaluate", *args, "--no-mlflow"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    for f in (coco / "images" / "val2017").iterdir():  # the caption file without its images
        f.unlink()
    assert main(["--params", params, "evaluate", str(model_dir), "--reader", "coco", "--source", str(coco),
                 "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert "at least one captioned image exists" in err and len(err.splitlines()) == 1


def test_evaluation_is_logged_to_mlflow_and_a_missing_registered_model_is_named(
        model_dir, params, shared_datasets, tmp_path, capsys):
    import mlflow

    source = _val_only_coco(shared_datasets, tmp_path / "coco")
    out = tmp_path / "eval"
    assert main(["--params", params, "evaluate", str(model_dir), "--reader", "coco", "--source", str(source),
                 "--out", str(out)]) == 0
    about = json.loads((out / "evaluation.json").read_text())
    run = mlflow.MlflowClient(yaml.safe_load(Path(params).read_text())["tracking"]["uri"]).get_run(about["mlflow_run_id"])
    assert run.data.tags["data_version"] == about["data_version"] and run.data.tags["study"] == "evaluate"
    capsys.readouterr()
    assert main(["--params", params, "evaluate", "models:/no-such-model@champion", "--reader", "coco",
                 "--source", str(source)]) == 2
    err = capsys.readouterr().err.strip()
    assert "models:/no-such-model@champion: not found in the registry" in err and len(err.splitlines()) == 1
