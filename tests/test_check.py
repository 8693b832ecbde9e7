"""`cmr check`: every bad setting and a missing source are found before any stage (or DVC) removes an
output; the command line takes --set after the subcommand; `cmr list` answers without torch."""
import subprocess
import sys

import pytest
import yaml

from cmr.check import check_settings
from cmr.cli import main
from cmr.config import load_params
from cmr.errors import ConfigError


def _params(tmp_path, repo_root, **changes):
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["paths"] = {k: str(tmp_path / "out" / k) for k in raw["paths"]}
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "params.yaml"


def test_the_default_settings_pass(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    check_settings(load_params(_params(tmp_path, repo_root)))


def test_every_problem_is_listed_at_once_with_its_setting(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    path = _params(tmp_path, repo_root, data__source=str(tmp_path / "gone"), data__options={"bogus": 1},
                   finetune__losses={"infonse": 1.0}, pretrain__select_metric="val/t2i/MnR",
                   calibrate__method="sinkhron", index__kind="flatt")
    with pytest.raises(ConfigError) as e:
        check_settings(load_params(path))
    lines = str(e.value).splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["data.source", "data.options", "finetune.losses",
                                                   "pretrain.select_metric", "calibrate.method", "index.kind"]
    assert f"{tmp_path / 'gone'}: no such file or folder" in lines[0]
    assert "unknown option 'bogus'" in lines[1] and "did you mean 'infonce'" in lines[2]
    assert "did you mean 'sinkhorn'" in lines[4] and "did you mean 'flat'" in lines[5]


def test_an_unwritable_output_path_is_found(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    (tmp_path / "a-file").write_text("x")
    raw = yaml.safe_load(_params(tmp_path, repo_root).read_text())
    raw["paths"]["index"] = str(tmp_path / "a-file" / "index")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"^paths: .*a-file/index: cannot write in .*a-file \(Not a directory\)$"):
        check_settings(load_params(tmp_path / "params.yaml"))


def test_cmr_pipeline_checks_before_the_first_stage_replaces_anything(tmp_path, repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    path = _params(tmp_path, repo_root, index__kind="flatt")
    prepared = tmp_path / "out" / "prepared"
    prepared.mkdir(parents=True)
    (prepared / "items.jsonl").write_text("the previous good output\n")
    assert main(["--params", str(path), "pipeline"]) == 2
    assert "index.kind: unknown index 'flatt'" in capsys.readouterr().err
    assert (prepared / "items.jsonl").read_text() == "the previous good output\n"  # ingest never ran


def test_cmr_check_and_set_after_the_subcommand(tmp_path, repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    path = _params(tmp_path, repo_root)
    assert main(["check", "--params", str(path)]) == 0
    assert "fine" in capsys.readouterr().out
    assert main(["check", "--params", str(path), "--set", "data.source=/nowhere"]) == 2
    assert "data.source: /nowhere: no such file or folder" in capsys.readouterr().err
    # the typo is caught whichever side of the subcommand --set is on
    for argv in (["--set", "finetune.epoch=3", "stage", "finetune"], ["stage", "finetune", "--set", "finetune.epoch=3"]):
        assert main(["--params", str(path), *argv]) == 2
        assert "unknown key 'finetune.epoch' (did you mean 'epochs'?)" in capsys.readouterr().err


def test_list_readers_and_studies_do_not_import_torch(repo_root):
    code = ("import sys; from cmr.cli import main; main(['list', 'readers']); main(['list', 'studies']); "
            "print(sorted(m for m in ('torch', 'open_clip', 'ot') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo_root, check=True)
    assert out.stdout.splitlines()[-1] == "[]"
    assert "openclipart" in out.stdout and "wikipedia" in out.stdout


def test_study_names_read_from_source_match_the_imported_registry():
    from cmr.studies import load_all, names

    assert names() == load_all().names()


@pytest.mark.parametrize("query, message", [("", "the text query is empty"), ("   \t", "the text query is empty"),
                                            ("x" * 10_000, "10000 characters, more than data.max_text_chars=512")])
def test_an_empty_or_overlong_query_is_refused_before_any_search(query, message, repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    assert main(["search", query]) == 2
    assert message in capsys.readouterr().err
