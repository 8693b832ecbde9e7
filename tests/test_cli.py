"""The `cmr` command line: registries, errors that name what is wrong, exit codes."""
import pytest
import yaml

from cmr.cli import main


def test_list_shows_every_registry(capsys):
    for what, expected in (("losses", "infonce"), ("readers", "openclipart"), ("calibrators", "sinkhorn"),
                           ("indexes", "hnsw"), ("archs", "lite0-minilm"), ("studies", "wikipedia")):
        assert main(["list", what]) == 0
        assert expected in capsys.readouterr().out.split()


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

    m = {f"{d}/R@{k}": k / 100 for d in ("t2i", "i2t") for k in (1, 5, 10)} | {"rsum": 32.0}
    table = metrics_table({"val": m, "test": {"none": m, "sinkhorn": m}, "random": m}).splitlines()
    assert [ln.split()[0] for ln in table[1:]] == ["validation", "test,", "test,", "test,"]
    assert len(table) == 5  # header + 4 rows, no choice line without a choice
    chosen = {"t2i": {"method": "none", "options": {}}, "i2t": {"method": "sinkhorn", "options": {"epsilon": 0.1}}}
    last = metrics_table({"val": m, "test": {"none": m}, "random": m}, chosen=chosen).splitlines()[-1]
    assert last == "calibration chosen on validation: i2t sinkhorn {'epsilon': 0.1}, t2i none"
    assert "test, sinkhorn" in table[3] and table[3].split()[-7:] == ["1.0", "5.0", "10.0", "1.0", "5.0", "10.0",
                                                                      "32.0"]


def test_unknown_study_names_the_nearest(capsys):
    assert main(["study", "wikipedai"]) == 2
    assert "did you mean 'wikipedia'" in capsys.readouterr().err


def test_study_splits_option_is_checked_before_any_work(repo_root, capsys):
    params = ["--params", str(repo_root / "params.yaml")]
    assert main([*params, "study", "wikipedia", "--splits", "3"]) == 2
    assert "study 'wikipedia' has no --splits option" in capsys.readouterr().err
    assert main([*params, "study", "calibration", "--splits", "0"]) == 2
    assert "--splits must be a whole number >= 1, got 0" in capsys.readouterr().err


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
