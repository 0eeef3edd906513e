"""The W&B backend without a pipeline, offline as it runs here (no internet): what reaches the run is read
back from the run folder's transaction log (tests/tracker_stores.py). The curves of both training stages
in one run (each against its own step), the config as W&B config with secrets masked, reports in the
run's files, a failed run's reason, a stage on other ranks sent from the flow process, and one line for
a server that cannot be reached."""

import multiprocessing
import pickle
import sys
from pathlib import Path

import pytest
from tracker_stores import WandbRun

from dpoflow.base.config import PipelineConfig
from dpoflow.engine.tracking import (TrackingError, curve_callback, curve_to_send, open_run, replay, send,
                                     tracker_class)

pytest.importorskip("wandb")

SECRET = "hf_" + "Zq8xK2mP4vN7wR1tY6uB3cD9eF0gH5jL"  # a Hub token's shape: redact.py must catch it


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No W&B account here: a key or mode from the environment would send the test online."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)


def config(tmp_path, **tracking):
    return PipelineConfig.model_validate({"name": "t", "data": {"sources": ["x.jsonl"]}, "workdir": str(tmp_path),
                                          "tracking": {"backend": "wandb", **tracking}})


def trainer_bits(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[]), TrainerState, TrainerControl


def test_curves_config_results_and_reports_reach_an_offline_run_in_the_workdir(tmp_path):
    args, TrainerState, TrainerControl = trainer_bits(tmp_path)
    run = open_run(config(tmp_path, tags={"team": "nlp"}), "run-1")
    folder = Path(run.location)  # the run folder, in the workdir (not where the command was started)
    assert folder.parent == tmp_path / "wandb" and folder.name.startswith("offline-run-")
    assert folder.name.endswith(run.ref.run_id)
    # sft logs steps 1-2, then dpo starts again at step 1: both curves whole, each against its own step.
    sft = curve_callback(run.ref, "sft")
    state = TrainerState(global_step=0, log_history=[])
    sft.on_train_begin(args, state, TrainerControl())
    for step, loss in ((1, 2.5), (2, 2.0)):
        state.global_step = step
        sft.on_log(args, state, TrainerControl(), logs={"loss": loss, "train_runtime": 1.0})
    dpo = curve_callback(run.ref, "dpo")
    state = TrainerState(global_step=4, log_history=[{"loss": 0.69, "rewards/accuracies": 0.5, "step": 2},
                                                     {"loss": 0.6, "rewards/accuracies": 0.75, "step": 4}])
    dpo.on_train_begin(args, state, TrainerControl())  # resumed from checkpoint-4: its history first
    dpo.on_train_begin(args, state, TrainerControl())  # a retry sends nothing twice
    state.global_step = 6
    dpo.on_log(args, state, TrainerControl(), logs={"loss": 0.5, "rewards/accuracies": 1.0})
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.md").write_text("# summary\n")
    (run_dir / "data_report.md").write_text("# data\n")
    (run_dir / "forgetting.png").write_bytes(png_bytes())
    run.finish({"metrics": {"tuned_accuracy": 0.75}, "judge": {"win_rate": 0.6}}, run_dir, passed=True)

    got = WandbRun.read(folder)
    assert got.run_id == run.ref.run_id and got.name == "run-1" and got.project == "t"
    assert got.curve("sft/loss") == [(1, 2.5), (2, 2.0)]
    assert got.curve("dpo/loss") == [(2, 0.69), (4, 0.6), (6, 0.5)]
    assert got.curve("dpo/rewards/accuracies") == [(2, 0.5), (4, 0.75), (6, 1.0)]
    assert not any("runtime" in key and key.startswith("sft/") for row in got.history for key in row)
    assert got.summary["eval/tuned_accuracy"] == 0.75 and got.summary["judge/win_rate"] == 0.6
    assert got.config["dpo.beta"] == "0.1" and got.config["tracking.backend"] == "wandb"
    assert "tracking.uri" not in got.config
    assert "team:nlp" in got.tags and got.summary["team"] == "nlp" and got.summary["dpoflow.pipeline"] == "t"
    assert {"reports/summary.md", "reports/data_report.md", "reports/forgetting.png"} <= got.files
    assert (folder / "files" / "reports" / "summary.md").read_text() == "# summary\n"
    assert any(row.get("reports/forgetting", {}).get("_type") == "image-file" for row in got.history)
    assert got.summary["dpoflow.status"] == "FINISHED" and got.exit_code == 0


def png_bytes() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(out, format="PNG")
    return out.getvalue()


def test_secrets_never_reach_the_run_folder_and_a_failed_run_says_why(tmp_path):
    cfg = PipelineConfig.model_validate({
        "name": "t", "data": {"sources": ["x.jsonl"]}, "workdir": str(tmp_path),
        "deploy": {"job_variables": {"env": {"HF_TOKEN": SECRET}}},
        "tracking": {"backend": "wandb", "tags": {"note": f"pushed with {SECRET}", "api_key": "abc"}}})
    run = open_run(cfg, "run-1")
    run.end("FAILED", f"boom with {SECRET}")
    folder = next((tmp_path / "wandb").glob("offline-run-*"))
    for file in (tmp_path / "wandb").rglob("*"):  # the transaction log, W&B's own logs, every file
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), file
    got = WandbRun.read(folder)
    assert got.summary["note"] == "pushed with <redacted>" and got.summary["api_key"] == "<redacted>"
    assert got.summary["dpoflow.failure"] == "boom with <redacted>"
    assert got.summary["dpoflow.status"] == "FAILED" and got.exit_code == 1


def _rank(ref_bytes: bytes, out_dir: str) -> None:
    """A rank torchrun launched, as far as tracking goes: another process given the pickled ref."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    ref = pickle.loads(ref_bytes)
    callback = curve_callback(ref, "dpo")
    state = TrainerState(global_step=1, log_history=[])
    callback.on_log(TrainingArguments(output_dir=out_dir, report_to=[]), state, TrainerControl(),
                    logs={"loss": 0.69})


def test_a_stage_on_other_ranks_is_sent_from_the_flow_process_after_it(tmp_path):
    run = open_run(config(tmp_path), "run-1")
    rank = multiprocessing.get_context("spawn").Process(target=_rank, args=(pickle.dumps(run.ref), str(tmp_path)))
    rank.start()
    rank.join(300)
    assert rank.exitcode == 0
    # The rank wrote nothing (no second writer of the run), so the flow sends the recorded curve.
    assert not list((tmp_path / "wandb").glob("offline-run-*"))[1:]
    assert curve_to_send(run.ref, "dpo", "ran") and curve_to_send(run.ref, "dpo", "cached")
    stage = tmp_path / "dpo"
    stage.mkdir()
    (stage / "log_history.json").write_text('[{"loss": 0.69, "step": 1}, {"loss": 0.5, "step": 2}]')
    assert replay(run.ref, "dpo", stage) == 2
    send(run.ref, "end", "FINISHED")
    assert WandbRun.read(next((tmp_path / "wandb").glob("offline-run-*"))).curve("dpo/loss") == [(1, 0.69), (2, 0.5)]


def test_a_stage_that_ran_in_the_flow_process_is_not_sent_twice(tmp_path):
    args, TrainerState, TrainerControl = trainer_bits(tmp_path)
    run = open_run(config(tmp_path), "run-1")
    callback = curve_callback(run.ref, "sft")
    callback.on_log(args, TrainerState(global_step=1), TrainerControl(), logs={"loss": 2.0})
    assert not curve_to_send(run.ref, "sft", "ran") and curve_to_send(run.ref, "dpo", "ran")
    send(run.ref, "end", "FINISHED")


def test_an_api_key_or_a_server_makes_the_run_online(tmp_path, monkeypatch):
    tracker = tracker_class("wandb")
    assert tracker("", str(tmp_path)).mode() == "offline"
    assert tracker("https://wandb.example", str(tmp_path)).mode() == "online"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracker("", str(tmp_path)).mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # W&B's own setting, when the user gives it
    assert tracker("", str(tmp_path)).mode() == "offline"


def test_an_unreachable_server_is_one_line_without_the_password(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")  # W&B retries until its init timeout
    with pytest.raises(TrackingError) as e:
        open_run(config(tmp_path, uri="http://bob:pa55w0rd-xyz@127.0.0.1:1"), "run-1")
    message = str(e.value)
    assert "\n" not in message and "pa55w0rd" not in message and "bob" not in message and "k" * 40 not in message
    assert message.startswith("tracking.backend wandb: cannot reach tracking.uri http://127.0.0.1:1: ")


def test_a_missing_client_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(TrackingError, match=r"^tracking.backend wandb needs the wandb client: pip install "
                                            r"'dpoflow\[tracking\]'$"):
        open_run(config(tmp_path / "elsewhere"), "run-1")


def test_a_sweep_opens_every_variant_first_and_each_run_still_gets_its_own_values(tmp_path):
    first, second = (open_run(config(tmp_path), f"v{i}", {"dpoflow.sweep": "s1"}) for i in (1, 2))
    send(first.ref, "metrics", {"dpo/loss": 0.7}, 1)
    send(second.ref, "metrics", {"dpo/loss": 0.6}, 1)
    first.end("FAILED", "boom")
    second.end("FINISHED")
    one, two = (WandbRun.read(Path(run.location)) for run in (first, second))
    assert one.curve("dpo/loss") == [(1, 0.7)] and two.curve("dpo/loss") == [(1, 0.6)]
    assert (one.exit_code, two.exit_code) == (1, 0) and one.summary["dpoflow.failure"] == "boom"
    assert "dpoflow.sweep:s1" in one.tags
