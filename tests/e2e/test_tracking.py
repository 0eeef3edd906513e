"""Experiment tracking through the CLI, as a user turns it on: the short demo sent to a real local MLflow
(a SQLite store) and to TensorBoard event files, read back with their own readers. The curves MLflow
holds are the ones the stages recorded, live on the first run and replayed from the cache on the second;
a sweep's variants are runs of their own; a gate-blocked run is FAILED; an unreachable tracker is one
line without its password."""

import json
import os
import subprocess
from pathlib import Path

import pytest

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
