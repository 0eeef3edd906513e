import sys

import pytest

from dpoflow.base.artifacts import folder_digest, is_intact, json_digest, seal
from dpoflow.base.cache import StageInputs, code_digest, key_value


def make(folder, **files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_digest_follows_content_not_path(tmp_path):
    a = make(tmp_path / "a", w="weights", t="tok")
    b = make(tmp_path / "elsewhere" / "b", w="weights", t="tok")
    assert folder_digest(a) == folder_digest(b)
    (b / "w").write_text("weightz")
    assert folder_digest(a) != folder_digest(b)


def test_sealed_folder_detects_changed_and_missing_files_and_ignores_stray_ones(tmp_path):
    folder = make(tmp_path / "out", w="weights", t="tok")
    make(folder / "adapter", a="adapter weights")
    assert not is_intact(folder)
    seal(folder)
    assert is_intact(folder)
    (folder / "w").write_text("tampered")
    assert not is_intact(folder)
    seal(folder)
    # A file the manifest does not list (a desktop's .DS_Store) leaves what the stage made unchanged.
    (folder / ".DS_Store").write_bytes(b"")
    (folder / "nested").mkdir()
    (folder / "nested" / "Thumbs.db").write_text("x")
    assert is_intact(folder)
    (folder / "adapter" / "a").write_text("altered")
    assert not is_intact(folder)
    seal(folder)
    (folder / "t").unlink()
    assert not is_intact(folder)
    (folder / "manifest.json").write_text("{broken")
    assert not is_intact(folder)


def test_stage_key_changes_with_arguments_and_stage_not_with_their_order_or_run_only_ones():
    from dpoflow.base.config import DPOSpec
    from dpoflow.base.records import ModelRef

    def key(stage="dpo", **arguments):
        policy = StageInputs(stage=stage, module=__name__, not_key={"out_dir": "where"},
                             depends_on=lambda inputs: {"backend": "trl"})
        return policy.compute_key(None, arguments, {})

    model = ModelRef(path="/a/model", digest="m1", source="builtin:x", role="base")
    k = key(model=model, spec=DPOSpec(beta=0.1), out_dir="/a")
    assert k.startswith("dpo-") and k == key(spec=DPOSpec(beta=0.1), model=model, out_dir="/elsewhere")
    assert k == key(model=model.model_copy(update={"path": "/b/model"}), spec=DPOSpec(beta=0.1), out_dir="/a")
    assert k != key(model=model, spec=DPOSpec(beta=0.2), out_dir="/a")
    assert k != key(model=model.model_copy(update={"digest": "m2"}), spec=DPOSpec(beta=0.1), out_dir="/a")
    assert k != key("sft", model=model, spec=DPOSpec(beta=0.1), out_dir="/a")


def test_key_value_takes_records_by_digest_and_leaves_out_what_the_schema_marks():
    from dpoflow.base.config import EvaluateSpec, GateSpec, PublishSpec
    from dpoflow.base.hardware import TrainingPlan
    from dpoflow.base.records import ModelRef, TrainedAdapter

    start = ModelRef(path="/x", digest="s", source="builtin:x", role="base")
    adapter = TrainedAdapter(path="/y", digest="a", start=start, reference="r", metrics={})
    assert key_value(start) == "s" and key_value(adapter) == {"digest": "a", "start": "s"}
    assert key_value(EvaluateSpec(gate=GateSpec(max_drop=9))) == key_value(EvaluateSpec())
    assert "gate" not in key_value(EvaluateSpec()) and key_value(EvaluateSpec(limit=3))["limit"] == 3
    assert key_value(PublishSpec(max_attempts=9, token_secret="s")) == key_value(PublishSpec())
    plan = TrainingPlan("fp32", False, 4, 2, warnings=["w"], reasons=["free memory 3 GiB"])
    assert key_value(plan) == key_value(TrainingPlan("fp32", False, 4, 2))
    assert key_value(plan) != key_value(TrainingPlan("fp32", False, 8, 1))
    with pytest.raises(TypeError, match="cannot be part of a cache key"):
        key_value(object())


def test_every_field_left_out_of_keys_is_a_real_field_and_says_why():
    import dataclasses
    import inspect

    from dpoflow.base import config, hardware

    classes = [c for _, c in inspect.getmembers(config, inspect.isclass) if issubclass(c, config.Strict)]
    for cls in [*classes, hardware.TrainingPlan]:
        names = cls.model_fields if hasattr(cls, "model_fields") else {f.name for f in dataclasses.fields(cls)}
        for name, why in cls.not_key.items():
            assert name in names and len(why) > 10, (cls, name)


def test_code_digest_covers_the_stage_module(tmp_path, monkeypatch):
    path = tmp_path / "fake_stage.py"
    path.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import fake_stage  # noqa: F401

    before = code_digest("fake_stage")
    path.write_text("X = 2\n")
    code_digest.cache_clear()
    assert code_digest("fake_stage") != before
    del sys.modules["fake_stage"]


def test_every_stage_task_names_its_stage_and_leaves_out_only_parameters_it_has_with_a_reason():
    import inspect

    from dpoflow.tasks import stage_policy
    from dpoflow.tasks.dpo import dpo_task, reference_task
    from dpoflow.tasks.evaluate import evaluate_task, start_scores_task
    from dpoflow.tasks.export import export_task
    from dpoflow.tasks.judge import judge_task, start_answers_task
    from dpoflow.tasks.model import model_task
    from dpoflow.tasks.prepare import prepare_task
    from dpoflow.tasks.publish import card_task, publish_task
    from dpoflow.tasks.sft import sft_task

    tasks = [model_task, prepare_task, sft_task, reference_task, dpo_task, start_scores_task, evaluate_task,
             start_answers_task, judge_task, export_task, card_task, publish_task]
    assert [stage_policy(t).stage for t in tasks] == ["model", "prepare", "sft", "reference", "dpo", "baseline",
                                                      "evaluate", "answers", "judge", "export", "card", "publish"]
    for t in tasks:
        policy, parameters = stage_policy(t), set(inspect.signature(t.fn).parameters)
        assert "out_dir" in parameters
        assert set(policy.not_key) - parameters <= {"checkpoint_dir", "keeper", "tracker"}  # the run-only ones it lacks
        assert all(len(why) > 10 for why in policy.not_key.values())
    assert set(stage_policy(publish_task).not_key) - set(stage_policy(dpo_task).not_key) == {"message"}


def test_judge_keys_answers_by_generation_only_and_the_judge_by_who_judges():
    """A judge setting re-runs only the judge (the start model's answers are shared); a generation setting
    re-runs both; where the API key comes from, and evaluate.judge itself in the evaluate key, change nothing."""
    from dpoflow.base.config import EvaluateSpec, JudgeSpec
    from dpoflow.flows.pipeline import stage_key
    from dpoflow.base.records import Answers, ModelRef, PreparedData, TrainedAdapter
    from dpoflow.tasks.evaluate import evaluate_task
    from dpoflow.tasks.judge import answers_spec, judge_task, start_answers_task

    start = ModelRef(path="/m", digest="m" * 8, source="builtin:tiny-llama", role="base")
    data = PreparedData(path="/d", digest="d" * 8, train="/d/t", heldout="/d/h", rejected="/d/r", counts={})
    adapter = TrainedAdapter(path="/a", digest="a" * 8, start=start, reference="", metrics={})
    answers = Answers(path="/s", digest="s" * 8, file="/s/answers.jsonl", count=1)

    def keys(spec):
        answer_key = stage_key(start_answers_task, {"start": start, "data": data, "spec": answers_spec(spec)})[1]
        judge_key = stage_key(judge_task, {"adapter": adapter, "data": data, "answers": answers, "spec": spec})[1]
        return answer_key, judge_key

    base = JudgeSpec(enabled=True, kind="openai", url="http://127.0.0.1:1/v1", model="a")
    a0, j0 = keys(base)
    a1, j1 = keys(base.model_copy(update={"model": "b"}))
    assert a1 == a0 and j1 != j0
    a2, j2 = keys(base.model_copy(update={"max_new_tokens": 7}))
    assert a2 != a0 and j2 != j0
    assert keys(base.model_copy(update={"api_key_env": "OTHER", "timeout_seconds": 5, "batch_size": 2})) == (a0, j0)
    material = stage_key(judge_task, {"adapter": adapter, "data": data, "answers": answers, "spec": base})[2]
    assert material["extra"] == {"judge": {"url": base.url, "model": "a", "extra_body": {}}}  # who judges

    def evaluate_key(ev):
        return stage_key(evaluate_task, {"base": start, "adapter": adapter, "data": data, "spec": ev,
                                         "start_scores": answers, "beta": 0.1, "max_length": 64})[1]

    assert evaluate_key(EvaluateSpec(judge=base)) == evaluate_key(EvaluateSpec())


def toy_writes(out_dir: str, spec, times: int = 1):
    from pathlib import Path

    from dpoflow.base.records import Artifact

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "out.txt").write_text(f"{spec.beta} " * times)
    return Artifact(path=out_dir, digest=seal(folder))


def test_prefect_caches_a_stage_under_the_key_the_flow_derives_from_its_arguments(tmp_path, monkeypatch):
    """The runner derives the key first (it names the output folder); Prefect's cache policy derives it
    again from the same arguments, defaults filled in: a second call is Prefect's cache hit, under
    that key, and another value re-runs the stage."""
    from prefect import flow

    from dpoflow.base.cache import Workspace
    from dpoflow.base.config import DPOSpec
    from dpoflow.flows.pipeline import StageRunner, stage_key
    from dpoflow.tasks import stage_task

    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    toy_task = stage_task(toy_writes, stage="toy")
    workspace = Workspace(tmp_path / "work")

    @flow
    def three_calls():
        run = StageRunner(workspace)
        run(toy_task, spec=DPOSpec(beta=0.3))
        run(toy_task, spec=DPOSpec(beta=0.3), times=1)  # the default, given: the same key
        run(toy_task, spec=DPOSpec(beta=0.4))
        return run.rows

    rows = three_calls()
    assert [row.status for row in rows] == ["ran", "cached", "ran"]
    _, key, material = stage_key(toy_task, {"spec": DPOSpec(beta=0.3)})
    assert rows[0].key == rows[1].key == key != rows[2].key
    assert material["inputs"]["times"] == 1 and "out_dir" not in material["inputs"]
    assert workspace.result_file("toy", key).is_file()
    assert (workspace.stage_dir("toy", key) / "out.txt").read_text() == "0.3 "


def test_code_digest_follows_only_the_dpoflow_modules_a_stage_imports(tmp_path):
    from pathlib import Path

    from dpoflow.base.cache import PACKAGE, _dpoflow_imports

    stage = tmp_path / "stage.py"
    stage.write_text("from dpoflow.base.records import ModelRef\n\ndef f():\n    from dpoflow.engine.models import load_model\n")
    found = {p.relative_to(PACKAGE).as_posix() for p in _dpoflow_imports(stage)}
    assert {"base/records.py", "engine/models.py", "base/config.py", "base/artifacts.py", "engine/tiny.py"} <= found
    assert "app/cli.py" not in found and "app/wizard.py" not in found
    assert all(Path(PACKAGE / f).is_file() for f in found)
    # A stage of tasks/ (imported through the dpoflow/tasks link or from the folder itself): its relative
    # imports resolve inside dpoflow.tasks.
    for source in (PACKAGE / "tasks" / "dpo.py", PACKAGE.parent / "tasks" / "dpo.py"):
        found = {p.relative_to(PACKAGE).as_posix() for p in _dpoflow_imports(source)}
        assert {"tasks/__init__.py", "engine/training.py", "base/config.py"} <= found
        assert not any(f.startswith(("flows/", "app/")) or f.startswith("tasks/") and f != "tasks/__init__.py"
                       for f in found), found


def test_code_digest_sees_an_edit_to_a_shared_module_after_parsing_it(tmp_path, monkeypatch):
    """Each dpoflow module's imports are parsed once per version of the file, not once per process."""
    from dpoflow.base import cache

    package = tmp_path / "dpoflow"
    package.mkdir()
    (package / "shared.py").write_text("X = 1\n")
    stage = tmp_path / "stage.py"
    stage.write_text("from dpoflow.shared import X\n")
    monkeypatch.setattr(cache, "PACKAGE", package)
    assert cache._dpoflow_imports(stage) == {package / "shared.py"}
    (package / "other.py").write_text("Y = 2\n")
    (package / "shared.py").write_text("from dpoflow.other import Y\nX = 1\n")  # a new import
    assert cache._dpoflow_imports(stage) == {package / "shared.py", package / "other.py"}
