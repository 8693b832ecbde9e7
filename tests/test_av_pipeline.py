"""Any modality pair through one pipeline: the video<->audio path of the stages, end to end on the embedded sample."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cmr.config import load_params
from cmr.errors import ConfigError
from cmr.retrieval.evaluation import direction_names
from cmr.stages._methods import METHODS, method_for
from cmr.training.av_fit import streams
from conftest import REPO

AV_SAMPLE = REPO / "data" / "raw" / "av_sample"


def test_direction_names_follow_the_pair():
    assert direction_names() == {"t2i": "t2i", "i2t": "i2t"}
    assert direction_names("video", "audio") == {"t2i": "a2v", "i2t": "v2a"}
    assert direction_names("image", "audio") == {"t2i": "a2i", "i2t": "i2a"}


def test_streams_pair_frames_with_a_mel():
    assert streams("video", "audio") == {"video": "video", "audio": "audio"}
    assert streams("audio", "image") == {"video": "image", "audio": "audio"}
    for gallery, query in (("image", "text"), ("video", "image"), ("audio", "text")):
        with pytest.raises(ConfigError, match="cmmixer architecture pairs"):
            streams(gallery, query)


def test_arch_picks_the_method():
    assert method_for("cmmixer-tiny") is METHODS.get("cmmixer")
    assert method_for("lite0-minilm") is METHODS.get("two_tower")


def test_two_tower_refuses_a_media_pair(tmp_path):
    p = load_params(REPO / "params.yaml", {"data.gallery": "video", "data.query": "audio",
                                           "paths.prepared": str(tmp_path / "none")})
    with pytest.raises(ConfigError, match="need a cmmixer arch"):
        method_for(p.model.arch).pretrain(p)


def test_av_profile_parses():
    p = load_params(REPO / "params" / "av.yaml")
    assert (p.data.gallery, p.data.query, p.model.arch) == ("video", "audio", "cmmixer-tiny")
    assert p.paths.prepared.startswith("data/av/") and p.register.model_name != load_params(REPO / "params.yaml").register.model_name


@pytest.mark.slow
def test_video_audio_pipeline_end_to_end(tmp_path, monkeypatch):
    """``cmr pipeline`` on the embedded video<->audio sample, 1 epoch each: every stage's output, the
    directions named a2v/v2a, one query per gallery clip, the reconstruction figure, a registered model."""
    params = yaml.safe_load((REPO / "params" / "av.yaml").read_text())
    params["data"]["source"] = str(AV_SAMPLE)
    params["pretrain"]["epochs"] = params["finetune"]["epochs"] = 1
    params["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "av-test"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    out = subprocess.run([sys.executable, "-m", "cmr.cli", "--params", "params.yaml", "pipeline"], cwd=tmp_path,
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "data/av/reports/metrics.json").read_text())
    assert metrics["pair"]["directions"] == {"t2i": "a2v", "i2t": "v2a"}
    for split, n in metrics["counts"].items():
        assert n > 0, split
    test = np.load(tmp_path / "data/av/embeddings/test.npz")
    assert test["image"].shape == test["text"].shape and (test["text_item"] == np.arange(len(test["ids"]))).all()
    assert (tmp_path / "data/av/models/pretrain/reconstruction.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "data/av/reports/register.json").read_text())["run_id"]
    # a champion is re-scored on validation by the architecture's own code: it must give the stage's number
    monkeypatch.chdir(tmp_path)
    p = load_params(tmp_path / "params.yaml")
    rescored = method_for(p.model.arch).validate(p, "data/av/models/finetune/model", "cpu")
    assert rescored["rsum"] == pytest.approx(json.loads((tmp_path / "data/av/models/finetune/metrics.json")
                                                        .read_text())["val/rsum"], abs=1e-6)
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(params["tracking"]["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{params['register']['model_name']}@champion")
    audio = sorted((AV_SAMPLE / "audio").glob("*.wav"))[:2]
    emb = model.predict(pd.DataFrame({"audio_path": [str(a) for a in audio]}))
    assert emb.shape == (2, params["model"]["embed_dim"]) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    table = subprocess.run([sys.executable, "-m", "cmr.cli", "--params", "params.yaml", "metrics"], cwd=tmp_path,
                           env=env, capture_output=True, text=True)
    assert table.returncode == 0 and "a2v R@1" in table.stdout and "v2a R@10" in table.stdout


@pytest.mark.slow
def test_cmmixer_study_quick(tmp_path, monkeypatch):
    """The study's smoke version on the embedded sample: a table with the scratch, cutmix and random rows, a plot."""
    from cmr.studies import load_all

    monkeypatch.chdir(tmp_path)
    p = load_params(REPO / "params" / "av.yaml", {"tracking.uri": f"sqlite:///{tmp_path}/mlflow.db",
                                                  "paths.cache": str(tmp_path / "cache"), "data.source": str(AV_SAMPLE)})
    out = load_all().get("cmmixer")(p, quick=True)
    assert [r["recipe"] for r in out["rows"]] == ["scratch", "cutmix"] and out["best"] == "cutmix"
    table = (tmp_path / "studies/cmmixer-quick/table.md").read_text()
    assert "random ranking" in table and "a2v R@1" in table
    assert (tmp_path / "studies/cmmixer-quick/plot.png").stat().st_size > 5_000


def test_check_knows_cmmixer_archs_and_the_pair():
    from cmr.check import check_settings

    check_settings(load_params(REPO / "params" / "av.yaml"))
    with pytest.raises(ConfigError, match="unknown mixer 'cutmx'"):
        check_settings(load_params(REPO / "params" / "av.yaml", {"cmmixer.mixer": "cutmx"}))
    with pytest.raises(ConfigError, match="need a cmmixer arch"):
        check_settings(load_params(REPO / "params.yaml", {"data.gallery": "video", "data.query": "audio"}))
