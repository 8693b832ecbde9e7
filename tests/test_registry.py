"""The champion rule on a real MLflow registry (sqlite in tmp_path): what is compared, when the
champion is re-scored, and that a failed registration leaves no version behind."""
import json
import subprocess
import sys
import textwrap

import pytest

mlflow = pytest.importorskip("mlflow")

from cmr.errors import CmrError, ConfigError  # noqa: E402
from cmr.tracking.mlflow_log import artifact_location, latest_data_version, log_pipeline_run  # noqa: E402


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


def test_artifacts_go_beside_a_sqlite_store_and_to_a_tracking_servers_own_root(tmp_path):
    assert artifact_location(f"sqlite:///{tmp_path}/m/mlflow.db") == (tmp_path / "m" / "artifacts").as_uri()
    # a server serves its artifact root to every machine; a local path would be one client's disk
    assert artifact_location("http://127.0.0.1:5000") is None
    assert artifact_location("https://mlflow.example.org") is None


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


WORKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import cmr.tracking.mlflow_log as tracking
    from cmr.tracking.mlflow_log import configure, log_pipeline_run

    read_champion = tracking.champion_score

    def slow_read(*args, **kwargs):  # widen the window between reading the champion and acting on it
        out = read_champion(*args, **kwargs)
        time.sleep(2.0)
        return out

    tracking.champion_score = slow_read

    uri, model_dir, score, barrier, n, i = (sys.argv[1], sys.argv[2], float(sys.argv[3]), Path(sys.argv[4]),
                                            int(sys.argv[5]), sys.argv[6])
    configure(uri, "t")  # all open the fresh store at once (its schema is created then)
    (barrier / i).touch()  # store open: wait for the others, then all register at once
    while len(list(barrier.iterdir())) < n:
        time.sleep(0.01)
    out = log_pipeline_run(uri=uri, experiment="t", run_name="r", params={"a": 1}, metrics={"val": {"rsum": score}},
                           histories={}, artifacts={}, model_dir=model_dir,
                           tags={"data_version": "d1", "eval_settings": "e"}, model_name="m", alias="champion",
                           select_metric="val/rsum", rescore=None, pip_requirements=[])
    print(json.dumps(out))
""")


@pytest.mark.slow  # four processes, each importing MLflow: 25-100 s on two busy cores
def test_concurrent_registrations_on_a_fresh_store_end_on_the_best_model_with_truthful_decisions(tmp_path):
    """Four processes register at once on a store that does not exist yet: none crashes while the
    schema is created, and the outcome is that of registering one after another in version order."""
    (tmp_path / "model" / "model").mkdir(parents=True)
    (tmp_path / "model" / "model" / "spec.json").write_text("{}")
    (tmp_path / "barrier").mkdir()
    (tmp_path / "worker.py").write_text(WORKER)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    scores = ["211.69", "203.86", "211.69", "150.0"]  # two equal best: the first registered must keep it
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), uri, str(tmp_path / "model"), s,
                               str(tmp_path / "barrier"), str(len(scores)), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, s in enumerate(scores)]
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    score_of = {o["version"]: o["val/rsum"] for o in outs}
    assert sorted(score_of, key=int) == ["1", "2", "3", "4"]
    # the serial outcome, in the order the lock let them register (= version order)
    champion = None
    for version in sorted(score_of, key=int):
        decision = client.get_run(next(o["run_id"] for o in outs if o["version"] == version)).data.tags[
            "champion_decision"]
        assert client.get_model_version("m", version).tags["champion_decision"] == decision
        new, same = score_of[version], "(logged with the same data_version, eval_settings)"
        if champion is None:
            expected = f"moved to v{version}: val/rsum={new:.4f} (no champion yet)"
        elif new > score_of[champion]:
            expected = f"moved to v{version}: val/rsum={new:.4f} > champion v{champion}'s {score_of[champion]:.4f} {same}"
        else:
            expected = f"kept v{champion}: new v{version} val/rsum={new:.4f} <= champion's {score_of[champion]:.4f} {same}"
        assert decision == expected
        champion = version if expected.startswith("moved") else champion
    assert str(client.get_model_version_by_alias("m", "champion").version) == champion
    assert score_of[champion] == max(score_of.values())
    assert [m.name for m in client.search_registered_models()] == ["m"]  # the lock is released
