"""KTO through the CLI, as a user runs it: `dpo.method=kto` on the demo's pairs (each split into a
desirable and an undesirable example) and on unpaired thumbs-up/down rows (data/demo/feedback.jsonl).
Every stage runs, the gate passes, and the same command again is all cached.

One epoch of KTO instead of the demo's three, and no judged comparison, to keep the module short (a sweep
over methods runs in test_methods.py; its table's KTO note is checked in tests/test_kto.py)."""

import json
import subprocess
from pathlib import Path

import pytest
from cli_runs import demo_runner

pytestmark = pytest.mark.slow
KTO = ["evaluate.judge.enabled=false", "dpo.method=kto", "dpo.epochs=1"]
STAGES = ["model", "prepare", "sft", "dpo", "baseline", "evaluate", "export", "card"]


@pytest.fixture(scope="module")
def cli(repo, tmp_path_factory):
    """Runs `dpoflow <command> demo` in one workdir (later runs find the model stage cached) and returns the
    finished process."""
    tmp = tmp_path_factory.mktemp("kto")
    return demo_runner(repo, tmp)


def _sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _summary(proc: subprocess.CompletedProcess) -> dict:
    folder = next(line.split(":", 1)[1].strip() for line in proc.stdout.splitlines() if line.startswith("run folder:"))
    return json.loads((Path(folder) / "summary.json").read_text())


def _statuses(summary: dict) -> dict[str, str]:
    return {row["stage"]: row["status"] for row in summary["stages"]}


def test_kto_on_the_demo_pairs_runs_every_stage_passes_the_gate_and_is_cached_next_time(cli):
    summary = _summary(proc := cli("run", *_sets(*KTO)))
    assert list(_statuses(summary)) == STAGES
    assert set(list(_statuses(summary).values())[1:]) == {"ran"}  # the model may come from another test's run
    assert summary["method"] == "kto" and "objective:     kto; reference: sft model" in proc.stdout
    assert summary["reference"].endswith("with the DPO adapter disabled [trl; computed on the fly from it]")
    m, dpo = summary["metrics"], summary["dpo_metrics"]
    assert dpo["kto/desirable"] == dpo["kto/undesirable"] == 514  # the demo's train pairs, split
    # Held-out data are pairs: scored as for DPO, and the demo's gate (+20 points on them) applies.
    assert m["tuned_accuracy"] >= m["start_accuracy"] + 0.2, m
    assert summary["forgetting"]["passed"] is True and not summary["evaluation_notes"]
    assert Path(summary["exports"]["merged"], "model.safetensors").is_file()

    again = _summary(cli("run", *_sets(*KTO)))
    assert set(_statuses(again).values()) == {"cached"}


def test_kto_on_unpaired_feedback_reports_what_it_can_and_is_cached_next_time(cli, repo):
    feedback = repo / "data" / "demo" / "feedback.jsonl"
    # No held-out pair exists, so the demo's required gain on them cannot apply.
    items = [*KTO, f"data.sources=[{feedback}]", "evaluate.gate.required_gain={}"]
    summary = _summary(proc := cli("run", *_sets(*items)))
    statuses = _statuses(summary)
    assert list(statuses) == STAGES and {statuses[s] for s in STAGES[1:]} == {"ran"}
    report = json.loads((Path(summary["run_dir"]) / "data_report.json").read_text())
    counts = report["counts"]
    assert counts["desirable"] + counts["undesirable"] == counts["train"] + counts["heldout"] > 500
    assert counts["train_unpaired"] == counts["train"] and counts["heldout_unpaired"] == counts["heldout"]
    assert report["sources"][str(feedback)]["format"] == "unpaired (auto)"
    dpo = summary["dpo_metrics"]
    assert dpo["kto/desirable"] + dpo["kto/undesirable"] == counts["train"]
    # No pair to compare: said, not faked; the implicit reward per label instead.
    m = summary["metrics"]
    assert "tuned_accuracy" not in m and m["heldout_pairs"] == 0 and m["heldout_unpaired"] == counts["heldout"]
    assert m["tuned_kto_reward_margin"] > 0 and 0 <= m["tuned_kto_reward_accuracy"] <= 1
    assert "evaluation:    held-out preference accuracy: unavailable: the held-out rows are unpaired" in proc.stdout
    assert "dpoflow_preference" not in {row["task"] for row in summary["forgetting"]["table"]}
    assert summary["forgetting"]["passed"] is True
    assert Path(summary["exports"]["merged"], "model.safetensors").is_file()

    again = _summary(cli("run", *_sets(*items)))
    assert set(_statuses(again).values()) == {"cached"}
