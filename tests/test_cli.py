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
