"""dpoflow.engine.tracking without a pipeline: the training-curve callback (live lines, and a resumed run's
checkpoint history sent first, each step once), and what reaches the tracker is redacted."""

import json

import pytest

from dpoflow.base.config import PipelineConfig
from dpoflow.engine.tracking import (TrackingError, TrackerRef, curve_callback, flat_params, open_run, replay,
                              result_metrics, send, shown_uri)

SECRET = "hf_" + "Zq8xK2mP4vN7wR1tY6uB3cD9eF0gH5jL"  # a Hub token's shape: redact.py must catch it


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_run(tmp_path, name="run-1") -> TrackerRef:
    config = PipelineConfig.model_validate({"name": "t", "data": {"sources": ["x.jsonl"]}, "workdir": str(tmp_path),
                                            "tracking": {"backend": "tensorboard"}})
    return open_run(config, name).ref


def test_a_resumed_trainer_sends_the_checkpoint_history_first_then_each_new_line_once(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    ref = tensorboard_run(tmp_path)
    callback = curve_callback(ref, "dpo")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[])
    # As a Trainer resumed from checkpoint-4 has it: the lines logged before the stop.
    state = TrainerState(global_step=4, log_history=[{"loss": 0.69, "rewards/accuracies": 0.5, "step": 2},
                                                     {"loss": 0.6, "rewards/accuracies": 0.75, "step": 4}])
    callback.on_train_begin(args, state, TrainerControl())
    callback.on_train_begin(args, state, TrainerControl())  # a second begin (a retry) sends nothing twice
    state.global_step = 6
    callback.on_log(args, state, TrainerControl(), logs={"loss": 0.5, "rewards/accuracies": 1.0, "epoch": 1.5,
                                                         "train_runtime": 3.2})
    send(ref, "end", "FINISHED")
    got = scalars(tmp_path / "tensorboard" / "t" / "run-1")
    assert [s for s, _ in got["dpo/loss"]] == [2, 4, 6]
    assert [v for _, v in got["dpo/loss"]] == pytest.approx([0.69, 0.6, 0.5])
    assert [v for _, v in got["dpo/rewards/accuracies"]] == pytest.approx([0.5, 0.75, 1.0])
    assert "dpo/train_runtime" not in got  # wall-clock figures are not part of the curve


def test_a_fresh_trainer_sends_nothing_before_its_first_log(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    ref = tensorboard_run(tmp_path)
    callback = curve_callback(ref, "sft")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[])
    state = TrainerState(global_step=0, log_history=[])
    callback.on_train_begin(args, state, TrainerControl())
    state.global_step = 2
    callback.on_log(args, state, TrainerControl(), logs={"loss": 2.5})
    send(ref, "end", "FINISHED")
    assert scalars(tmp_path / "tensorboard" / "t" / "run-1") == {"sft/loss": [(2, 2.5)]}


def test_replay_sends_a_stage_folder_log_history(tmp_path):
    ref = tensorboard_run(tmp_path)
    stage = tmp_path / "stage"
    stage.mkdir()
    log = [{"loss": 1.0, "step": 1}, {"loss": 0.5, "step": 2}, {"train_loss": 0.75, "step": 2}]
    (stage / "log_history.json").write_text(json.dumps(log))
    assert replay(ref, "sft", stage) == 3
    assert replay(ref, "dpo", tmp_path / "no-such-stage") == 0
    send(ref, "end", "FINISHED")
    got = scalars(tmp_path / "tensorboard" / "t" / "run-1")
    assert got["sft/loss"] == [(1, 1.0), (2, 0.5)] and got["sft/train_loss"] == [(2, 0.75)]


def test_results_become_eval_forgetting_and_judge_metrics():
    summary = {"metrics": {"tuned_accuracy": 1.0, "start_accuracy": 0.5},
               "forgetting": {"table": [{"task": "k", "base": 40.0, "tuned": 41.0, "delta": 1.0},
                                        {"task": "m", "base": None, "tuned": 3.0, "delta": None}]},
               "judge": {"win_rate": 0.75, "judge": "builtin:tiny-reward", "win_rate_ci": [0.5, 0.9]}}
    assert result_metrics(summary) == {"eval/tuned_accuracy": 1.0, "eval/start_accuracy": 0.5,
                                       "forgetting/k/base": 40.0, "forgetting/k/tuned": 41.0,
                                       "forgetting/k/delta": 1.0, "forgetting/m/tuned": 3.0, "judge/win_rate": 0.75}


def test_shown_uri_drops_the_user_and_password():
    assert shown_uri("http://alice:s3cret-pass@mlflow.example:5000/") == "http://mlflow.example:5000/"
    assert shown_uri("sqlite:////tmp/x/mlflow.db") == "sqlite:////tmp/x/mlflow.db"
    assert flat_params({"a": {"b": 1, "c": [1, 2]}, "d": "x", "e": {}}) == {"a.b": "1", "a.c": "[1, 2]", "d": "x",
                                                                           "e": "{}"}


def test_secrets_in_the_config_and_tags_never_reach_mlflow(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = PipelineConfig.model_validate({
        "name": "t", "data": {"sources": ["x.jsonl"]}, "workdir": str(tmp_path),
        "deploy": {"job_variables": {"env": {"HF_TOKEN": SECRET}}},
        "tracking": {"backend": "mlflow", "uri": uri, "tags": {"note": f"pushed with {SECRET}", "api_key": "abc"}}})
    run = open_run(config, "run-1")
    run.end("FAILED", f"boom with {SECRET}")
    got = MlflowClient(tracking_uri=uri).get_run(run.ref.run_id)
    everything = json.dumps({"params": got.data.params, "tags": got.data.tags})
    assert SECRET not in everything and '"abc"' not in everything
    assert got.data.params["dpo.beta"] == "0.1" and "tracking.uri" not in got.data.params
    assert got.data.params["tracking.backend"] == "mlflow"
    assert got.data.tags["dpoflow.pipeline"] == "t" and got.data.tags["dpoflow.failure"].startswith("boom with ")
    assert got.info.status == "FAILED"


def test_an_unreachable_tracker_is_one_line_without_the_password(tmp_path):
    config = PipelineConfig.model_validate({
        "name": "t", "data": {"sources": ["x.jsonl"]}, "workdir": str(tmp_path),
        "tracking": {"backend": "mlflow", "uri": "http://bob:pa55w0rd-xyz@127.0.0.1:1"}})
    with pytest.raises(TrackingError) as e:
        open_run(config, "run-1")
    message = str(e.value)
    assert "\n" not in message and "pa55w0rd" not in message and "bob" not in message
    assert message.startswith("tracking.backend mlflow: cannot reach tracking.uri http://127.0.0.1:1")


def test_a_run_stopped_by_ctrl_c_is_killed_and_one_that_raised_is_failed_with_the_error(tmp_path):
    from mlflow import MlflowClient

    from dpoflow.flows.pipeline import ending_tracked_run
    from dpoflow.base.runtime import StageInterrupted

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = PipelineConfig.model_validate({"name": "t", "data": {"sources": ["x.jsonl"]}, "workdir": str(tmp_path),
                                            "tracking": {"backend": "mlflow", "uri": uri}})
    stopped, broken = open_run(config, "run-1"), open_run(config, "run-2")
    with pytest.raises(KeyboardInterrupt), ending_tracked_run(stopped):
        raise StageInterrupted("dpo at step 3")
    with pytest.raises(ValueError), ending_tracked_run(broken):
        raise ValueError(f"bad rows, see {SECRET}")
    client = MlflowClient(tracking_uri=uri)
    killed, failed = client.get_run(stopped.ref.run_id), client.get_run(broken.ref.run_id)
    assert killed.info.status == "KILLED" and killed.data.tags["dpoflow.failure"] == "interrupted dpo at step 3"
    assert failed.info.status == "FAILED"
    assert failed.data.tags["dpoflow.failure"] == "ValueError: bad rows, see <redacted>"


@pytest.mark.parametrize("backend", ["mlflow", "wandb", "trackio"])
def test_doctor_names_a_missing_tracking_client(repo, monkeypatch, backend):
    import importlib.util

    from dpoflow.base.config import load_pipeline
    from dpoflow.app.doctor import preflight_problems

    config = load_pipeline("demo", repo / "pipelines.yaml", [f"tracking.backend={backend}"])
    assert preflight_problems(config, "trl", None) == []  # installed here (the dev extra)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == backend else real(name, *a))
    assert preflight_problems(config, "trl", None) == [
        f"tracking.backend is {backend} but the {backend} package is not installed: pip install 'dpoflow[tracking]', "
        "or set tracking.backend: none"]
