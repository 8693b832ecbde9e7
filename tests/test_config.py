import pytest
import yaml

from cmr.config import Params, load_params, parse_params
from cmr.errors import CmrError, ConfigError
from cmr.registry import Registry


def test_repo_params_parse_and_cover_every_section(repo_root):
    p = load_params(repo_root / "params.yaml")
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    # params.yaml writes every section out: nothing silently falls back to a default
    assert set(raw) == set(Params.model_fields)
    assert p.paths.prepared == raw["paths"]["prepared"]


def test_unknown_key_names_key_and_nearest():
    with pytest.raises(ConfigError) as e:
        parse_params({"finetune": {"epocs": 3}})
    assert "finetune.epocs" in str(e.value) and "epochs" in str(e.value)


def test_unknown_top_level_section():
    with pytest.raises(ConfigError, match="unknown key 'calibration'.*calibrate"):
        parse_params({"calibration": {}})


def test_bad_value_names_field_and_value():
    with pytest.raises(ConfigError, match="data.val_fraction"):
        parse_params({"data": {"val_fraction": 1.5}})
    with pytest.raises(ConfigError, match="calibrate.query_bank"):
        parse_params({"calibrate": {"query_bank": "everything"}})


def test_params_are_frozen():
    p = parse_params({})
    with pytest.raises(Exception):
        p.seed = 3


def test_overrides_and_missing_file(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("seed: 1\n")
    assert load_params(f, {"finetune.epochs": 2}).finetune.epochs == 2
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    f.write_text("seed: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(f)


def test_registry_errors_suggest_nearest():
    r = Registry("loss")
    r.register("infonce")(object)
    with pytest.raises(KeyError, match="did you mean 'infonce'"):
        r.get("infonse")
    # a setting's unknown name is a CmrError, so the CLI prints one line and exits 2 (not a traceback)
    with pytest.raises(CmrError, match=r"^unknown loss 'infonse' \(did you mean 'infonce'\?\); registered: infonce$"):
        r.get("infonse")
    with pytest.raises(CmrError, match=r"unknown loss \['infonce'\]"):  # a YAML list where a name belongs
        r.get(["infonce"])
    with pytest.raises(KeyError, match="registered twice"):
        r.register("infonce")(object)


def test_atomic_write_leaves_old_file_on_crash(tmp_path):
    from cmr.io import atomic_path, write_json

    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text().strip().startswith("{") and '"a": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_dir_replacement(tmp_path):
    from cmr.io import atomic_path

    d = tmp_path / "model"
    d.mkdir()
    (d / "old").write_text("x")
    with atomic_path(d) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in d.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_set_overrides_are_typed_and_checked(repo_root):
    from cmr.config import parse_overrides

    over = parse_overrides(["finetune.epochs=2", "calibrate.options={epsilon: [0.1, 0.2]}"])
    p = load_params(repo_root / "params.yaml", over)
    assert p.finetune.epochs == 2 and p.calibrate.options == {"epsilon": [0.1, 0.2]}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["epochs"])
    with pytest.raises(ConfigError, match="finetune.epocs"):
        load_params(repo_root / "params.yaml", parse_overrides(["finetune.epocs=2"]))


def test_cli_stage_error_exits_nonzero_with_a_named_key(repo_root, capsys):
    from cmr.cli import main

    assert main(["--params", str(repo_root / "params.yaml"), "--set", "data.readr=x", "stage", "ingest"]) == 2
    assert "data.readr" in capsys.readouterr().err


def test_register_metric_must_be_one_of_the_metrics(tmp_path):
    from cmr.tracking.mlflow_log import log_pipeline_run

    uri = f"sqlite:///{tmp_path / 'never.db'}"
    with pytest.raises(ConfigError, match=r"register metric 'val/bogus' is not in the metrics; have val/rsum, val/t2i/R@1"):
        log_pipeline_run(uri=uri, experiment="x", run_name="r", params={}, metrics={"val": {"rsum": 1.0, "t2i/R@1": 0.1}},
                         histories={}, artifacts={}, model_dir=str(tmp_path), tags={}, model_name="m", alias="a",
                         select_metric="val/bogus", rescore=lambda uri: 0.0, pip_requirements=[])
    assert not (tmp_path / "never.db").exists()  # nothing logged, no half-made run


def test_a_key_given_twice_in_params_is_an_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 0\npretrain:\n  epochs: 3\n  lr: 0.001\n  epochs: 8\n")
    with pytest.raises(ConfigError, match=r"params\.yaml: not valid YAML: key 'epochs' appears twice \(lines 3 and 5\)"):
        load_params(path)
    path.write_text("seed: 0\npretrain:\n  epochs: 3\nfinetune:\n  epochs: 8\n")  # same key, other sections
    assert (load_params(path).pretrain.epochs, load_params(path).finetune.epochs) == (3, 8)


@pytest.mark.parametrize("key,value,message", [
    ("alias", "a/b", "String should match pattern"), ("alias", "latest", "reserved by MLflow"),
    ("alias", "V12", "reserved by MLflow"), ("model_name", "it's", "String should match pattern"),
    ("model_name", "a/b", "String should match pattern")])
def test_registry_names_follow_mlflows_rules(key, value, message):
    with pytest.raises(ConfigError, match=rf"'register\.{key}': .*{message}"):
        parse_params({"register": {key: value}})
    assert parse_params({"register": {"alias": "prod-2", "model_name": "cmr.v2_test"}}).register.alias == "prod-2"
