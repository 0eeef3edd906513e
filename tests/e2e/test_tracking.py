"""Experiment tracking through the CLI, as a user turns it on: the short demo sent to a real local MLflow
(a SQLite store), to W&B offline, to Trackio and to TensorBoard event files, read back from what those
clients wrote. The curves MLflow and W&B hold are the ones the stages recorded, live on the first run and
replayed from the cache on the second; a sweep's variants are runs of their own; a gate-blocked run is
FAILED; an unreachable tracker is one line without its password."""

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
from tracker_stores import TrackioProject, WandbRun, wandb_run_folders

pytestmark = pytest.mark.slow

# The demo, short, every stage (judge included), one log line per step.
FAST = ["sft.max_steps=2", "sft.logging_steps=1", "dpo.max_steps=4", "dpo.logging_steps=1", "evaluate.limit=10",
        "evaluate.gate.mode=warn", "evaluate.judge.limit=8"]


@pytest.fixture(scope="module")
def demo(repo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracking")
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_DIR", "TRACKIO_DIR"):
        env.pop(name, None)  # no W&B account here: a key would send the run online

    def run(*items: str, command: str = "run", vary: tuple = (), expect: int = 0) -> subprocess.CompletedProcess:
        cmd = ["python", "-m", "dpoflow", command, "demo", "-f", str(repo / "pipelines.yaml"), *vary]
        for item in (f"workdir={tmp / 'work'}", *FAST, *items):
            cmd += ["--set", item]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc

    run.tmp = tmp
    run.mlflow = f"sqlite:///{tmp / 'mlflow.db'}"
    return run


def summary_of(proc: subprocess.CompletedProcess) -> dict:
    run_dir = next(line.split(":", 1)[1].strip() for line in proc.stdout.splitlines() if line.startswith("run folder:"))
    return json.loads((Path(run_dir) / "summary.json").read_text())


def curve(log_file: Path, key: str) -> list[tuple[int, float]]:
    return [(e["step"], e[key]) for e in json.loads(log_file.read_text()) if key in e]


def mlflow_curve(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def tracked_twice(demo):
    """The short demo run twice with MLflow tracking: (first summary, second summary, MLflow client)."""
    from mlflow import MlflowClient

    items = ["tracking.backend=mlflow", f"tracking.uri={demo.mlflow}", "tracking.experiment=demo-tracking",
             "tracking.tags={team: nlp}"]
    first = demo(*items)
    second = demo(*items)
    return first, second, MlflowClient(tracking_uri=demo.mlflow)


def test_a_run_sends_config_curves_results_and_reports_to_mlflow(demo, tracked_twice):
    proc, _, client = tracked_twice
    summary = summary_of(proc)
    assert {row["status"] for row in summary["stages"]} == {"ran"}
    tracking = summary["tracking"]
    assert tracking["backend"] == "mlflow" and tracking["experiment"] == "demo-tracking"
    assert f"tracked:       mlflow experiment 'demo-tracking', run {tracking['run_id']}" in proc.stdout
    assert f"tracked: mlflow experiment 'demo-tracking', run {tracking['run_id']}" in \
        (Path(summary["run_dir"]) / "summary.md").read_text()
    run = client.get_run(tracking["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "demo-tracking"
    assert run.data.params["dpo.max_steps"] == "4" and run.data.params["model.source"] == "builtin:tiny-llama"
    assert run.data.tags["team"] == "nlp" and run.data.tags["dpoflow.pipeline"] == "demo"
    # The live curves are the ones each stage recorded.
    run_dir = Path(summary["run_dir"])
    for stage, key in (("sft", "loss"), ("dpo", "loss"), ("dpo", "rewards/accuracies")):
        recorded = curve(run_dir / stage / "log_history.json", key)
        assert recorded and mlflow_curve(client, run.info.run_id, f"{stage}/{key}") == recorded, (stage, key)
    # Results: the held-out preference metrics, the forgetting table and the judge's figures.
    metrics = run.data.metrics
    for name, value in summary["metrics"].items():
        assert metrics[f"eval/{name}"] == pytest.approx(value)
    for row in summary["forgetting"]["table"]:
        for field in ("base", "tuned", "delta"):
            assert metrics[f"forgetting/{row['task']}/{field}"] == pytest.approx(row[field])
    assert metrics["judge/win_rate"] == pytest.approx(summary["judge"]["win_rate"])
    assert run.info.artifact_uri.startswith((demo.tmp / "mlartifacts").as_uri())  # beside the SQLite store
    reports = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {"summary.md", "summary.json", "data_report.md", "forgetting.md", "judge.md", "config.json"} <= reports
    # The model card names the tracker and experiment, never the store's address.
    card = (run_dir / "card" / "README.md").read_text()
    assert "Tracked: mlflow, experiment `demo-tracking`" in card and "mlflow.db" not in card


def test_a_cached_rerun_is_a_new_run_with_the_same_curves(tracked_twice):
    first_proc, second_proc, client = tracked_twice
    first, second = summary_of(first_proc), summary_of(second_proc)
    assert {row["status"] for row in second["stages"]} == {"cached"}
    assert second["tracking"]["run_id"] != first["tracking"]["run_id"]
    assert client.get_run(second["tracking"]["run_id"]).info.status == "FINISHED"
    for key in ("sft/loss", "sft/train_loss", "dpo/loss", "dpo/rewards/margins", "dpo/learning_rate"):
        want = mlflow_curve(client, first["tracking"]["run_id"], key)
        assert want and mlflow_curve(client, second["tracking"]["run_id"], key) == want, key
    assert client.get_run(second["tracking"]["run_id"]).data.metrics == \
        client.get_run(first["tracking"]["run_id"]).data.metrics


def test_tensorboard_gets_the_curves_and_results_as_event_files(demo, tracked_twice):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc = demo("tracking.backend=tensorboard", f"tracking.uri={demo.tmp / 'tb'}")
    summary = summary_of(proc)
    folder = Path(summary["tracking"]["location"])
    assert folder.parent == demo.tmp / "tb" / "demo"  # <log dir>/<experiment>/<run>
    events = EventAccumulator(str(folder))
    events.Reload()
    run_dir = Path(summary["run_dir"])
    for stage, key in (("sft", "loss"), ("dpo", "loss"), ("dpo", "rewards/accuracies")):
        got = [(e.step, e.value) for e in events.Scalars(f"{stage}/{key}")]
        want = curve(run_dir / stage / "log_history.json", key)
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    assert events.Scalars("eval/tuned_accuracy")[0].value == pytest.approx(summary["metrics"]["tuned_accuracy"])
    assert "config/text_summary" in events.Tags()["tensors"]


def test_each_sweep_variant_is_a_run_tagged_with_the_sweep(demo, tracked_twice):
    _, _, client = tracked_twice
    proc = demo("tracking.backend=mlflow", f"tracking.uri={demo.mlflow}", "tracking.experiment=demo-sweep",
                command="sweep", vary=("--vary", "dpo.beta=0.1,0.3"))
    sweep_dir = Path(next(line.split(":", 1)[1].strip() for line in proc.stdout.splitlines()
                          if line.startswith("sweep folder:")))
    experiment = client.get_experiment_by_name("demo-sweep")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["dpoflow.variant"] for r in runs) == ["dpo.beta=0.1", "dpo.beta=0.3"]
    assert {r.data.tags["dpoflow.sweep"] for r in runs} == {sweep_dir.name}
    assert {r.info.status for r in runs} == {"FINISHED"}
    for r in runs:
        variant = "v1" if r.data.tags["dpoflow.variant"] == "dpo.beta=0.1" else "v2"
        summary = json.loads((sweep_dir / variant / "summary.json").read_text())
        assert summary["tracking"]["run_id"] == r.info.run_id
        assert r.data.params["dpo.beta"] == summary["overrides"][-1].split("=")[1]
        assert mlflow_curve(client, r.info.run_id, "dpo/loss") == \
            curve(sweep_dir / variant / "dpo" / "log_history.json", "loss")


def test_a_gate_blocked_run_is_failed_with_the_reason(demo, tracked_twice):
    _, _, client = tracked_twice
    proc = demo("tracking.backend=mlflow", f"tracking.uri={demo.mlflow}", "tracking.experiment=demo-blocked",
                "evaluate.gate.mode=enforce", "evaluate.gate.required_gain={dpoflow_preference: 1000}", expect=1)
    assert "forgetting check failed" in proc.stderr
    experiment = client.get_experiment_by_name("demo-blocked")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"
    assert "dpoflow_preference" in run.data.tags["dpoflow.failure"]
    assert "eval/tuned_accuracy" in run.data.metrics  # what was measured is still there


def test_an_unreachable_tracker_is_one_line_without_the_password(demo):
    proc = demo("tracking.backend=mlflow", "tracking.uri=http://alice:Hunter2-pass@127.0.0.1:1", expect=2)
    output = proc.stdout + proc.stderr
    assert "Hunter2-pass" not in output and "alice" not in output
    (said,) = [line for line in proc.stderr.splitlines() if line.startswith("dpoflow:")]
    assert said.startswith("dpoflow: tracking.backend mlflow: cannot reach tracking.uri http://127.0.0.1:1: ")


# A DPO setting no other test here uses: the first W&B run trains dpo live (its curve sent as logged),
# with sft from the cache the MLflow runs left when they ran first (its curve replayed); the second run
# is all cached. Cheaper than a workdir of its own, and both ways a curve reaches W&B are in one run.
WANDB_RUN = ("tracking.backend=wandb", "dpo.beta=0.2")


def prefect_summary_artifact(tmp: Path, flow_run: str) -> str:
    """The run's summary as the Prefect artifact holds it, from the temporary server's database (it is
    stopped when the command ends)."""
    with sqlite3.connect(tmp / "prefect" / "prefect.db") as db:
        (data,) = db.execute("SELECT a.data FROM artifact a JOIN flow_run f ON f.id = a.flow_run_id "
                             "WHERE f.name = ? AND a.key = 'dpoflow-demo'", (flow_run,)).fetchone()
    return json.loads(data)


@pytest.fixture(scope="module")
def wandb_twice(demo):
    """The short demo run twice with W&B (offline: no key here): (first summary, second summary)."""
    return summary_of(demo(*WANDB_RUN)), summary_of(demo(*WANDB_RUN))


def test_wandb_offline_gets_config_curves_results_and_reports_in_the_workdir(demo, wandb_twice):
    summary, _ = wandb_twice
    tracking = summary["tracking"]
    folder = wandb_run_folders(demo.tmp / "work")[tracking["run_id"]]
    assert tracking["backend"] == "wandb" and tracking["location"] == str(folder)
    assert not (Path.cwd() / "wandb").exists()  # nothing where the command was started
    run = WandbRun.read(folder)
    assert run.exit_code == 0 and run.summary["dpoflow.status"] == "FINISHED" and run.project == "demo"
    assert run.config["dpo.beta"] == "0.2" and run.config["model.source"] == "builtin:tiny-llama"
    assert "tracking.uri" not in run.config and run.summary["dpoflow.pipeline"] == "demo"
    run_dir = Path(summary["run_dir"])
    stages = {row["stage"]: row["status"] for row in summary["stages"]}
    assert stages["dpo"] == "ran"  # its curve went live; sft's (cached or not) was sent after it
    for stage, key in (("sft", "loss"), ("sft", "train_loss"), ("dpo", "loss"), ("dpo", "rewards/accuracies")):
        recorded = curve(run_dir / stage / "log_history.json", key)
        assert recorded and run.curve(f"{stage}/{key}") == recorded, (stage, key)
    for name, value in summary["metrics"].items():
        assert run.summary[f"eval/{name}"] == pytest.approx(value)
    for row in summary["forgetting"]["table"]:
        assert run.summary[f"forgetting/{row['task']}/tuned"] == pytest.approx(row["tuned"])
    assert run.summary["judge/win_rate"] == pytest.approx(summary["judge"]["win_rate"])
    for name in ("summary.md", "summary.json", "data_report.md", "forgetting.md", "forgetting.png", "judge.md"):
        assert f"reports/{name}" in run.files
        assert (folder / "files" / "reports" / name).read_bytes() == (run_dir / name).read_bytes(), name
    assert run.summary["reports/forgetting"]["_type"] == "image-file"
    # Where to find it: the run folder's summary, the Prefect artifact, the model card (no folder).
    line = f"tracked: wandb experiment 'demo', run {tracking['run_id']} ({folder})"
    assert line in (run_dir / "summary.md").read_text()
    assert line in prefect_summary_artifact(demo.tmp, summary["flow_run"])
    card = (run_dir / "card" / "README.md").read_text()
    assert "Tracked: wandb, experiment `demo`" in card and str(demo.tmp) not in card


def test_wandb_cached_rerun_is_a_new_run_with_the_same_curves(demo, wandb_twice):
    first, second = wandb_twice
    assert {row["status"] for row in second["stages"]} == {"cached"}
    assert second["tracking"]["run_id"] != first["tracking"]["run_id"]
    folders = wandb_run_folders(demo.tmp / "work")
    before, after = (WandbRun.read(folders[s["tracking"]["run_id"]]) for s in (first, second))
    assert after.exit_code == 0
    for key in ("sft/loss", "sft/train_loss", "dpo/loss", "dpo/rewards/margins", "dpo/learning_rate"):
        assert before.curve(key) and after.curve(key) == before.curve(key), key
    results = [k for k in before.summary if k.startswith(("eval/", "forgetting/", "judge/"))]
    assert results and {k: after.summary[k] for k in results} == {k: before.summary[k] for k in results}


def test_trackio_gets_config_curves_results_and_reports_in_the_workdir(demo, wandb_twice):
    summary = summary_of(demo("tracking.backend=trackio", "dpo.beta=0.2", "tracking.experiment=demo-trackio"))
    tracking = summary["tracking"]
    store = demo.tmp / "work" / "trackio"
    assert tracking["location"] == f"{store / 'demo-trackio.db'} (trackio project 'demo-trackio')"
    project = TrackioProject(store, "demo-trackio")
    run = tracking["run_id"]
    assert project.runs() == [run]
    params = project.config(run)
    assert params["dpo.beta"] == "0.2" and params["tag.dpoflow.pipeline"] == "demo" and "tracking.uri" not in params
    run_dir = Path(summary["run_dir"])
    for stage, key in (("sft", "loss"), ("dpo", "loss"), ("dpo", "rewards/accuracies")):
        recorded = curve(run_dir / stage / "log_history.json", key)
        assert recorded and project.curve(run, f"{stage}/{key}") == recorded, (stage, key)
    assert project.curve(run, "eval/tuned_accuracy") == [(0, pytest.approx(summary["metrics"]["tuned_accuracy"]))]
    reports = project.artifacts(run)
    for name in ("summary.md", "data_report.md", "forgetting.md", "forgetting.png", "judge.md"):
        assert reports[name] == (run_dir / name).read_bytes(), name
    assert project.alerts(run) == {}
    assert f"tracked: trackio experiment 'demo-trackio', run {run}" in (run_dir / "summary.md").read_text()
    assert "Tracked: trackio, experiment `demo-trackio`" in (run_dir / "card" / "README.md").read_text()
