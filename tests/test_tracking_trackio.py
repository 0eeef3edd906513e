"""The Trackio backend without a pipeline: what reaches a run is read back from the project's SQLite
database (tests/tracker_stores.py). Trackio reads its folder once per process, so the tests of this
process share one folder (a run per test), and a second folder is refused in one line."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from tracker_stores import TrackioProject

from dpoflow.base.config import PipelineConfig
from dpoflow.engine.tracking import TrackingError, curve_callback, curve_to_send, open_run, replay, send

# Not importorskip: importing trackio fixes its folder for the process, before open_run can choose it.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("trackio") is None, reason="needs trackio")

SECRET = "hf_" + "Zq8xK2mP4vN7wR1tY6uB3cD9eF0gH5jL"  # a Hub token's shape: redact.py must catch it


@pytest.fixture(scope="session")
def folder():
    """This test process's Trackio folder (tests/conftest.py): whichever test imports trackio first, it is
    the one trackio writes to."""
    return Path(os.environ["TRACKIO_DIR"]).resolve()


def config(tmp_path, folder, project, **more):
    return PipelineConfig.model_validate({"name": "t", "data": {"sources": ["x.jsonl"]}, "workdir": str(tmp_path),
                                          "tracking": {"backend": "trackio", "uri": str(folder),
                                                       "experiment": project, **more}})


def test_curves_config_results_and_reports_reach_the_project_database(tmp_path, folder):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[])
    run = open_run(config(tmp_path, folder, "curves", tags={"team": "nlp"}), "run-1")
    assert run.location == f"{folder / 'curves.db'} (trackio project 'curves')"
    callback = curve_callback(run.ref, "dpo")
    state = TrainerState(global_step=4, log_history=[{"loss": 0.69, "rewards/accuracies": 0.5, "step": 2},
                                                     {"loss": 0.6, "rewards/accuracies": 0.75, "step": 4}])
    callback.on_train_begin(args, state, TrainerControl())  # resumed from checkpoint-4: its history first
    callback.on_train_begin(args, state, TrainerControl())
    state.global_step = 6
    callback.on_log(args, state, TrainerControl(), logs={"loss": 0.5, "rewards/accuracies": 1.0,
                                                         "train_runtime": 3.2})
    assert not curve_to_send(run.ref, "dpo", "ran")  # it reached the run live
    stage = tmp_path / "sft"
    stage.mkdir()
    (stage / "log_history.json").write_text(json.dumps([{"loss": 2.5, "step": 1}, {"loss": 2.0, "step": 2}]))
    assert curve_to_send(run.ref, "sft", "cached") and replay(run.ref, "sft", stage) == 2
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.md").write_text("# summary\n")
    (run_dir / "data_report.json").write_text('{"rows": 3}')
    run.finish({"metrics": {"tuned_accuracy": 0.75}, "judge": {"win_rate": 0.6}}, run_dir, passed=True)

    project = TrackioProject(folder, "curves")
    assert project.runs() == ["run-1"]
    assert project.curve("run-1", "dpo/loss") == [(2, 0.69), (4, 0.6), (6, 0.5)]
    assert project.curve("run-1", "dpo/rewards/accuracies") == [(2, 0.5), (4, 0.75), (6, 1.0)]
    assert project.curve("run-1", "sft/loss") == [(1, 2.5), (2, 2.0)]
    assert not any("runtime" in key for _, values in project.rows("run-1") for key in values)
    assert project.curve("run-1", "eval/tuned_accuracy") == [(0, 0.75)]
    assert project.curve("run-1", "judge/win_rate") == [(0, 0.6)]
    params = project.config("run-1")
    assert params["dpo.beta"] == "0.1" and params["tracking.backend"] == "trackio" and "tracking.uri" not in params
    assert params["tag.team"] == "nlp" and params["tag.dpoflow.pipeline"] == "t"
    assert project.artifacts("run-1") == {"summary.md": b"# summary\n", "data_report.json": b'{"rows": 3}'}
    assert project.alerts("run-1") == {}  # finished: nothing to warn about


def test_secrets_never_reach_the_folder_and_a_failed_run_says_why(tmp_path, folder):
    cfg = PipelineConfig.model_validate({
        "name": "t", "data": {"sources": ["x.jsonl"]}, "workdir": str(tmp_path),
        "deploy": {"job_variables": {"env": {"HF_TOKEN": SECRET}}},
        "tracking": {"backend": "trackio", "uri": str(folder), "experiment": "secrets",
                     "tags": {"note": f"pushed with {SECRET}", "api_key": "abc"}}})
    run = open_run(cfg, "run-1")
    send(run.ref, "metrics", {"dpo/loss": 0.69}, 1)
    run.end("FAILED", f"boom with {SECRET}")
    for file in folder.rglob("*"):
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), file
    project = TrackioProject(folder, "secrets")
    assert project.config("run-1")["tag.note"] == "pushed with <redacted>"
    assert project.config("run-1")["tag.api_key"] == "<redacted>"
    assert project.alerts("run-1") == {"dpoflow.failure": "boom with <redacted>", "dpoflow.status FAILED": None}


def test_a_second_folder_in_one_process_is_one_line(tmp_path, folder):
    open_run(config(tmp_path, folder, "first"), "run-1").end("FINISHED")  # this process's folder is set
    with pytest.raises(TrackingError) as e:
        open_run(config(tmp_path, tmp_path / "other", "second"), "run-1")
    assert str(e.value) == (f"tracking.uri (trackio folder {tmp_path / 'other'}): trackio in this process already "
                            f"writes to {folder} (it reads its folder once, when imported)")


def test_a_missing_client_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "trackio", None)
    with pytest.raises(TrackingError, match=r"^tracking.backend trackio needs the trackio package: pip install "
                                            r"'dpoflow\[tracking\]'$"):
        open_run(config(tmp_path, tmp_path / "missing", "x"), "run-1")


def test_a_sweep_opens_every_variant_first_and_each_run_still_gets_its_own_values(tmp_path, folder):
    # trackio.init of the second run marks the first finished: values sent to the first after it still land.
    first, second = (open_run(config(tmp_path, folder, "sweep"), f"v{i}", {"dpoflow.sweep": "s1"}) for i in (1, 2))
    send(first.ref, "metrics", {"dpo/loss": 0.7}, 1)
    send(second.ref, "metrics", {"dpo/loss": 0.6}, 1)
    first.end("FAILED", "boom")
    second.end("FINISHED")
    project = TrackioProject(folder, "sweep")
    assert project.curve("v1", "dpo/loss") == [(1, 0.7)] and project.curve("v2", "dpo/loss") == [(1, 0.6)]
    assert project.alerts("v1") == {"dpoflow.failure": "boom", "dpoflow.status FAILED": None}
    assert project.alerts("v2") == {}
    assert project.config("v1")["tag.dpoflow.sweep"] == "s1"
