"""The forgetting check's plain functions on the built-in tiny model (CPU, offline)."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from dpoflow.engine import forgetting
from dpoflow.engine.forgetting import LOCAL_TASKS, PREFERENCE_TASK, gate, report_chart, report_markdown

ALL_TASKS = LOCAL_TASKS + [PREFERENCE_TASK]


@pytest.fixture(scope="module")
def pairs(tiny_model, tmp_path_factory) -> Path:
    """Held-out pairs rendered with the tiny model's chat template. Some chosen answers are long (a
    random model gives them the lower log-prob), so the accuracy is far from 50% and a swapped
    target would show."""
    from dpoflow.engine.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    rows = []
    for i in range(24):
        prompt = tok.apply_chat_template([{"role": "user", "content": f"Is item {i} in stock?"}],
                                         tokenize=False, add_generation_prompt=True)
        chosen, rejected = ("yes", "no") if i % 2 else ("no", "yes")
        if i % 3 == 0:
            chosen = "Let me check the shelves for you first."
        rows.append({"prompt": prompt, "chosen": chosen + tok.eos_token, "rejected": rejected + tok.eos_token})
    path = tmp_path_factory.mktemp("pairs") / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def include_path(pairs, tmp_path_factory) -> Path:
    return forgetting.materialize_tasks(tmp_path_factory.mktemp("lm_eval_tasks"), pairs)


def scoring_accuracy(model, tokenizer, pairs: Path) -> float:
    """The independent computation: share of pairs where log p(chosen) > log p(rejected), in %."""
    from dpoflow.engine.scoring import completion_logps

    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    prompts = [r["prompt"] for r in rows]
    chosen = completion_logps(model, tokenizer, prompts, [r["chosen"] for r in rows])
    rejected = completion_logps(model, tokenizer, prompts, [r["rejected"] for r in rows])
    return 100.0 * (chosen > rejected).float().mean().item()


def test_committed_eval_data_is_what_the_script_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_evals", forgetting.EVALS_DIR / "make_evals.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    counts = module.write_all(tmp_path)
    assert all(50 <= n <= 120 for n in counts.values()), counts
    for name in counts:
        committed = (forgetting.EVALS_DIR / f"{name}.jsonl").read_text(encoding="utf-8")
        assert (tmp_path / f"{name}.jsonl").read_text(encoding="utf-8") == committed, name
        for row in map(json.loads, committed.splitlines()):
            assert 0 <= row["answer"] < len(row["choices"]) == len(set(row["choices"]))


def test_materialize_writes_tasks_with_absolute_data_paths(include_path, pairs):
    from lm_eval.tasks import TaskManager

    assert sorted(p.stem for p in include_path.glob("*.yaml")) == sorted(ALL_TASKS)
    for task in ALL_TASKS:
        config = yaml.safe_load((include_path / f"{task}.yaml").read_text())
        data = Path(config["dataset_kwargs"]["data_files"]["test"])
        assert config["task"] == task and data.is_absolute() and data.is_file()
    assert data == pairs.resolve()  # the preference task reads the pairs in place
    assert set(ALL_TASKS) <= set(TaskManager(include_path=str(include_path), include_defaults=False).all_tasks)


def test_materialize_without_pairs_has_no_preference_task(tmp_path):
    assert sorted(p.stem for p in forgetting.materialize_tasks(tmp_path).glob("*.yaml")) == sorted(LOCAL_TASKS)


def test_run_tasks_scores_every_local_task(tiny_model, include_path):
    scores = forgetting.run_tasks(str(tiny_model), None, ALL_TASKS, include_path, limit=10, batch_size=16,
                                  device="cpu")
    assert set(scores) == set(ALL_TASKS)
    assert all(0 <= v <= 100 for v in scores.values()), scores
    assert scores.samples == {t: 10 for t in ALL_TASKS}


def test_preference_task_matches_dpoflow_scoring(tiny_model, include_path, pairs):
    """lm-eval scores the prompt's trailing "\\n" as part of each choice (it moves trailing whitespace
    from the context to the continuation), so each log-prob is off by the same amount for both choices;
    the chosen-minus-rejected margin, and so the accuracy, must match dpoflow.engine.scoring exactly."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dpoflow.engine.models import load_model, load_tokenizer
    from dpoflow.engine.scoring import completion_logps

    model, tok = load_model(str(tiny_model), "float32"), load_tokenizer(str(tiny_model))
    expected = scoring_accuracy(model, tok, pairs)
    assert expected not in (0.0, 50.0, 100.0)  # else a swapped target could pass unnoticed
    scores = forgetting.run_tasks(str(tiny_model), None, [PREFERENCE_TASK], include_path, batch_size=16)
    assert scores[PREFERENCE_TASK] == pytest.approx(expected, abs=1e-3)  # float32 mean vs float64

    out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(tiny_model), "dtype": "float32"},
                                  tasks=[PREFERENCE_TASK], device="cpu", bootstrap_iters=0, batch_size=16,
                                  task_manager=TaskManager(include_path=str(include_path), include_defaults=False))
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    prompts = [r["prompt"] for r in rows]
    ours = (completion_logps(model, tok, prompts, [r["chosen"] for r in rows])
            - completion_logps(model, tok, prompts, [r["rejected"] for r in rows]))
    for sample in out["samples"][PREFERENCE_TASK]:
        (chosen, _), (rejected, _) = (resp[0] for resp in sample["resps"])
        assert chosen - rejected == pytest.approx(ours[sample["doc_id"]].item(), abs=1e-4)


def test_adapter_path_is_applied(tiny_model, include_path, pairs, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from dpoflow.engine.models import load_model, load_tokenizer

    torch.manual_seed(0)
    # init_lora_weights=False: random A and B, so the adapter changes the outputs (B starts at 0 otherwise).
    model = get_peft_model(load_model(str(tiny_model), "float32"),
                           LoraConfig(r=8, lora_alpha=64, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    expected = scoring_accuracy(model, load_tokenizer(str(tiny_model)), pairs)

    tuned = forgetting.run_tasks(str(tiny_model), str(tmp_path / "adapter"), ALL_TASKS, include_path)
    assert tuned[PREFERENCE_TASK] == pytest.approx(expected, abs=1e-3)
    # Not applied, every score would equal the base model's; applied, ~400 items can't all stay put.
    assert tuned != forgetting.run_tasks(str(tiny_model), None, ALL_TASKS, include_path)


BASE = {"dpoflow_knowledge": 60.0, "dpoflow_arithmetic": 40.0, "dpoflow_preference": 55.0}


def test_gate_passes_small_drops_and_fails_large_ones():
    ok = gate(BASE, {"dpoflow_knowledge": 58.0, "dpoflow_arithmetic": 41.0, "dpoflow_preference": 55.0})
    assert ok.passed and not ok.failures and all(r["ok"] for r in ok.rows)
    assert {r["task"]: r["delta"] for r in ok.rows}["dpoflow_knowledge"] == pytest.approx(-2.0)

    bad = gate(BASE, {"dpoflow_knowledge": 57.9, "dpoflow_arithmetic": 41.0, "dpoflow_preference": 55.0})
    assert not bad.passed and len(bad.failures) == 1 and "dpoflow_knowledge" in bad.failures[0]
    assert [r["task"] for r in bad.rows if not r["ok"]] == ["dpoflow_knowledge"]


def test_gate_per_task_limits_and_required_gains():
    tuned = {"dpoflow_knowledge": 55.0, "dpoflow_arithmetic": 40.0, "dpoflow_preference": 70.0}
    assert not gate(BASE, tuned).passed  # knowledge dropped 5 > 2
    assert gate(BASE, tuned, per_task_max_drop={"dpoflow_knowledge": 5.0}).passed
    assert gate(BASE, tuned, max_drop=5.0, required_gain={"dpoflow_preference": 15.0}).passed
    result = gate(BASE, tuned, max_drop=5.0, required_gain={"dpoflow_preference": 20.0})
    assert not result.passed and result.failures == [
        "dpoflow_preference: moved +15.0 points (55.0 -> 70.0), at least +20 required"]
    assert not gate(BASE, {**tuned, "dpoflow_arithmetic": 37.0}, per_task_max_drop={"dpoflow_knowledge": 5.0}).passed


def test_gate_fails_on_a_missing_score():
    result = gate(BASE, {"dpoflow_knowledge": 60.0, "dpoflow_arithmetic": 40.0}, max_drop=100.0)
    assert not result.passed and result.failures == ["dpoflow_preference: no tuned score"]


def test_reports(tmp_path):
    result = gate(BASE, {"dpoflow_knowledge": 50.0, "dpoflow_arithmetic": 41.0, "dpoflow_preference": 65.0},
                  required_gain={"dpoflow_preference": 5.0})
    text = report_markdown(result)
    assert "| dpoflow_knowledge | 60.0 | 50.0 | -10.0 | drop <= 2 | **no** |" in text
    assert "| dpoflow_preference | 55.0 | 65.0 | +10.0 | drop <= 2, gain >= 5 | yes |" in text
    assert "FAILED" in text and "dpoflow_knowledge: dropped 10.0 points" in text
    png = report_chart(result, tmp_path / "forgetting.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
