"""The champion rule on a real MLflow registry (sqlite in tmp_path): what is compared, when the
champion is re-scored, and that a failed registration leaves no version behind."""
import subprocess
import sys

import pytest

mlflow = pytest.importorskip("mlflow")

from cmr.errors import CmrError, ConfigError  # noqa: E402
from cmr.tracking.mlflow_log import latest_data_version, log_pipeline_run  # noqa: E402


@pytest.fixture
def registry(tmp_path):
    (tmp_path / "model" / "model").mkdir(parents=True)
    (tmp_path / "model" / "model" / "spec.json").write_text("{}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def register(score, data="d1", evals="instance ks=[1, 5, 10]", rescore=lambda uri: pytest.fail("re-scored"),
                 metric="val/rsum", alias="champion"):
        return log_pipeline_run(
            uri=uri, experiment="t", run_name="r", params={"a": 1},
            metrics={"val": {"rsum": score, "t2i/MnR": score}}, histories={}, artifacts={},
            model_dir=str(tmp_path / "model"), tags={"data_version": data, "eval_settings": evals},
            model_name="m", alias=alias, select_metric=metric, rescore=rescore, pip_requirements=[])

    register.uri = uri
    return register


def versions(uri):
    mlflow.set_tracking_uri(uri)
    return sorted(int(v.version) for v in mlflow.MlflowClient().search_model_versions("name='m'"))


def test_logged_score_is_compared_only_under_the_same_data_and_evaluation_settings(registry):
    assert registry(100.0)["alias_moved"]
    kept = registry(90.0)  # same data, same settings: the logged 100 stands
    assert not kept["alias_moved"] and "logged with the same data_version, eval_settings" in kept["decision"]
    # other ks: rsum sums other terms, so the champion is re-scored under the current settings
    moved = registry(120.0, evals="instance ks=[1, 5, 10, 50]", rescore=lambda uri: 110.0)
    assert moved["alias_moved"] and "champion v1's 110.0000 (re-scored" in moved["decision"]


def test_a_champion_whose_run_is_gone_is_re_scored(registry, tmp_path):
    first = registry(100.0)
    client = mlflow.MlflowClient()
    client.delete_run(first["run_id"])
    subprocess.run([sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", registry.uri], check=True,
                   capture_output=True)
    moved = registry(60.0, rescore=lambda uri: 50.0)
    assert moved["alias_moved"] and "champion v1's 50.0000 (re-scored" in moved["decision"]


def test_a_failure_before_or_after_the_decision_leaves_no_registered_version(registry):
    registry(100.0)

    def gone(uri):
        raise OSError("No such artifact: ''")

    with pytest.raises(CmrError, match="champion v1 of 'm' .* cannot be re-scored: No such artifact"):
        registry(200.0, data="d2", rescore=gone)
    assert versions(registry.uri) == [1]
    with pytest.raises(mlflow.exceptions.MlflowException):
        registry(200.0, alias="a/b")  # the config refuses this alias; here it fails after registration
    assert versions(registry.uri) == [1]
    assert latest_data_version(registry.uri, "m") == "d1"  # so scheduled retraining still sees d2 as new


def test_latest_data_version_skips_versions_of_runs_that_did_not_finish(registry):
    registry(100.0, data="d1")
    second = registry(90.0, data="d2", rescore=lambda uri: 100.0)
    assert latest_data_version(registry.uri, "m") == "d2"
    mlflow.MlflowClient().set_terminated(second["run_id"], "FAILED")
    assert latest_data_version(registry.uri, "m") == "d1"


def test_lower_is_better_metrics_cannot_pick_the_champion(registry):
    with pytest.raises(ConfigError, match="register metric 'val/t2i/MnR': lower is better"):
        registry(10.0, metric="val/t2i/MnR")


def test_git_provenance_counts_untracked_files_and_never_vouches_outside_git(tmp_path):
    from cmr.tracking.provenance import git_commit

    assert git_commit(tmp_path) == ("unknown", True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / ".gitignore").write_text("ignored/\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    (tmp_path / "ignored").mkdir()
    (tmp_path / "ignored" / "out.bin").write_text("output")
    sha, dirty = git_commit(tmp_path)
    assert len(sha) == 40 and not dirty  # ignored outputs do not count
    (tmp_path / "new_module.py").write_text("y = 2\n")
    assert git_commit(tmp_path) == (sha, True)
