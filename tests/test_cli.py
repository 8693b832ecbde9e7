"""The `cmr` command line: registries, errors that name what is wrong, exit codes."""
import ast
import json
import subprocess
import sys

import pytest
import yaml

from cmr.cli import main


def test_list_shows_every_registry(capsys):
    for what, expected in (("losses", "infonce"), ("readers", "openclipart"), ("calibrators", "sinkhorn"),
                           ("indexes", "hnsw"), ("archs", "lite0-minilm"), ("studies", "wikipedia")):
        assert main(["list", what]) == 0
        assert expected in capsys.readouterr().out.split()


HEAVY = ("open_clip", "timm", "transformers", "torch")


def _imported_by(argv: list[str], repo_root) -> tuple[str, list[str]]:
    """What ``cmr <argv>`` prints, and which of HEAVY it left in ``sys.modules`` (a fresh interpreter)."""
    code = (f"import sys; from cmr.cli import main; rc = main({argv!r}); "
            f"print('IMPORTED', sorted(m for m in {HEAVY!r} if m in sys.modules)); sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo_root, check=True)
    out, _, imported = run.stdout.rpartition("IMPORTED ")
    return out, ast.literal_eval(imported)


def test_list_archs_imports_neither_open_clip_nor_torch(repo_root):
    out, imported = _imported_by(["list", "archs"], repo_root)
    assert imported == []
    assert {"lite0-minilm", "lite2-minilm", "openclip:ViT-B-32", "openclip:RN50", "cmmixer-tiny"} <= set(out.split())


def test_list_mixers_imports_no_tower_library(repo_root):
    out, imported = _imported_by(["list", "mixers"], repo_root)
    assert not {"open_clip", "timm", "transformers"} & set(imported)
    assert {"cutmix", "mixup", "none"} <= set(out.split())


def test_search_without_an_index_says_what_to_run(tmp_path, repo_root, capsys):
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["paths"]["index"] = str(tmp_path / "no-index")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["--params", str(tmp_path / "params.yaml"), "search", "a red apple"]) == 2
    assert "no index yet" in capsys.readouterr().err


def test_search_needs_exactly_one_query_kind():
    with pytest.raises(SystemExit):
        main(["search"])
    with pytest.raises(SystemExit):
        main(["search", "text", "--image", "x.jpg"])


def test_metrics_table_prints_percentages_per_row():
    from cmr.cli import metrics_table

    m = {f"{d}/R@{k}": float(k) for d in ("t2i", "i2t") for k in (1, 5, 10)} | {"rsum": 32.0}  # percent
    table = metrics_table({"val": m, "test": {"none": m, "sinkhorn": m}, "random": m}).splitlines()
    assert [ln.split()[0] for ln in table[1:]] == ["validation", "test,", "test,", "test,"]
    assert len(table) == 5  # header + 4 rows, no choice line without a choice
    chosen = {"t2i": {"method": "none", "options": {}}, "i2t": {"method": "sinkhorn", "options": {"epsilon": 0.1}}}
    last = metrics_table({"val": m, "test": {"none": m}, "random": m}, chosen=chosen).splitlines()[-1]
    assert last == "calibration chosen on validation: i2t sinkhorn {'epsilon': 0.1}, t2i none"
    assert "test, sinkhorn" in table[3] and table[3].split()[-7:] == ["1.0", "5.0", "10.0", "1.0", "5.0", "10.0",
                                                                      "32.0"]


def _params_file(tmp_path, repo_root, **paths):
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["paths"].update({k: str(v) for k, v in paths.items()})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return ["--params", str(tmp_path / "params.yaml")]


def test_bad_params_and_overrides_are_one_line_errors(tmp_path, repo_root, capsys):
    params = _params_file(tmp_path, repo_root)
    cases = [
        (["--set", "seed.x=1", "metrics"], "--set seed.x: 'seed' is a value, not a section"),
        (["--set", "data.reader.x=1", "metrics"], "--set data.reader.x: 'data.reader' is a value, not a section"),
        (["--set", "finetune.epochs=[", "metrics"], "--set 'finetune.epochs=[': the value is not valid YAML"),
        (["--set", "evaluate.ks=[0]", "metrics"], "--set: 'evaluate.ks.0': Input should be greater than or equal to 1"),
        (["--set", "evaluate.ks=[]", "metrics"], "--set: 'evaluate.ks': Tuple should have at least 1 item"),
    ]
    for argv, message in cases:
        assert main([*params, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("cmr: error: ") and message in err, (argv, err)
    assert main(["--params", str(tmp_path), "metrics"]) == 2
    assert f"{tmp_path}: is a folder, not a settings file" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert main(["--params", str(tmp_path / "list.yaml"), "--set", "seed=1", "metrics"]) == 2
    assert "the top level must be a mapping of sections, got list" in capsys.readouterr().err
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00s\x00e")
    assert main(["--params", str(tmp_path / "binary.yaml"), "metrics"]) == 2
    assert "binary.yaml: not UTF-8 text" in capsys.readouterr().err


def test_metrics_names_a_corrupt_or_stale_metrics_file(tmp_path, repo_root, capsys):
    metrics = tmp_path / "metrics.json"
    params = _params_file(tmp_path, repo_root, metrics=metrics, calibration=tmp_path / "no-calibration")
    m = {f"{d}/R@{k}": float(k) for d in ("t2i", "i2t") for k in (1, 5, 10)} | {"rsum": 32.0}  # percent
    cases = [('{"val": {', f"{metrics}:1: breaks rule 'valid JSON'"),
             ("[1, 2]", f"{metrics}: breaks rule 'a JSON object': got list"),
             (json.dumps({"val": m}), f"{metrics}: breaks rule 'written by the evaluate stage with evaluate.ks [1, 5, 10]'")]
    for text, message in cases:
        metrics.write_text(text)
        assert main([*params, "metrics"]) == 2
        assert message in capsys.readouterr().err
    metrics.write_text(json.dumps({"val": m, "test": {"none": m}, "random": m}))
    assert main([*params, "metrics"]) == 0
    capsys.readouterr()
    assert main([*params, "--set", "evaluate.ks=[1, 2]", "metrics"]) == 2  # ks the file was not written with
    assert "no 't2i/R@2'" in capsys.readouterr().err


def test_search_k_must_be_positive(capsys):
    assert main(["search", "a red apple", "--k", "0"]) == 2
    assert "--k must be >= 1, got 0" in capsys.readouterr().err


def test_unknown_study_names_the_nearest(capsys):
    assert main(["study", "wikipedai"]) == 2
    assert "did you mean 'wikipedia'" in capsys.readouterr().err


def test_study_splits_option_is_checked_before_any_work(repo_root, capsys):
    params = ["--params", str(repo_root / "params.yaml")]
    assert main([*params, "study", "wikipedia", "--splits", "3"]) == 2
    assert "study 'wikipedia' has no --splits option" in capsys.readouterr().err
    for bad in ("0", "99999999999999999999"):
        assert main([*params, "study", "calibration", "--splits", bad]) == 2
        assert f"--splits must be a whole number from 1 to 1000, got {bad}" in capsys.readouterr().err


@pytest.mark.slow
def test_study_runs_through_the_cli_with_overrides(tmp_path, repo_root, shared_datasets, monkeypatch):
    """`cmr --set ... study NAME` reaches the study with the overridden params (a real quick study)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CMR_WIKIPEDIA", str(shared_datasets / "wikipedia_cmr"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["--params", str(repo_root / "params.yaml"), "--set", f"tracking.uri={uri}",
                 "study", "wikipedia", "--quick"]) == 0
    assert (tmp_path / "studies" / "wikipedia-quick").is_dir()
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.study = 'wikipedia'")
    assert len(runs) >= 2  # the parent and at least one nested cell
