"""The judged comparison through the CLI, as a user runs it: the demo (whose config turns the judge on,
with the built-in reward model) reports a win rate with its interval, a length-controlled win rate and
the answer lengths in the summary, the run folder, the model card and the terminal; a re-run is fully
cached; a generation setting re-judges without retraining; the gate can stop the release on the judge's
figures; a bad prompts file is one line."""

import json
import subprocess
from pathlib import Path

import pytest
from cli_runs import demo_command

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(repo, demo_home):
    def run(*overrides: str, expect: int = 0):
        cmd, env = demo_command(repo, demo_home, *overrides)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc

    run.tmp = demo_home
    return run


def failure_line(stderr: str) -> str:
    """The CLI's one line saying why the run failed (Prefect's own log lines may follow it)."""
    return next(line for line in stderr.splitlines() if line.startswith("dpoflow: pipeline 'demo' failed: "))


def summary_of(proc) -> dict:
    run_dir = next(line.split(":", 1)[1].strip() for line in proc.stdout.splitlines()
                   if line.startswith("run folder:"))
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    summary["status"] = {row["stage"]: row["status"] for row in summary["stages"]}
    return summary


def test_demo_judges_the_tuned_model_against_the_start_model(demo, demo_first_run):
    first = summary_of(demo_first_run)
    assert list(first["status"]) == ["model", "prepare", "sft", "dpo", "baseline", "evaluate", "answers", "judge",
                                     "export", "card"]
    j = first["judge"]
    assert j["judge"] == "reward model builtin:tiny-reward" and j["prompts"] == first["metrics"]["heldout_pairs"]
    assert j["wins"] + j["ties"] + j["losses"] == j["prompts"]
    # The demo's DPO teaches the right label, which the start model gets right about half the time, and the
    # reward model learned the same labels: the tuned model wins clearly, at equal answer length too.
    assert j["win_rate"] > 0.6 and j["lc_win_rate"] > 0.6, j
    assert j["win_rate_ci"][0] < j["win_rate"] < j["win_rate_ci"][1]
    assert j["lc_win_rate_ci"][0] <= j["lc_win_rate"] <= j["lc_win_rate_ci"][1]
    assert j["wins"] > j["losses"] and j["mean_tokens_start"] > 0 and j["mean_tokens_tuned"] > 0
    assert j["unparseable"] == 0  # a reward model always answers

    run_dir = Path(first["run_dir"])
    judge_md = (run_dir / "judge.md").read_text()
    assert "length-controlled win rate" in judge_md and "95% CI" in judge_md
    samples = (run_dir / "judge_samples.md").read_text()
    assert "## Best wins" in samples and "| start model | tuned model |" in samples
    pairs = [json.loads(line) for line in open(run_dir / "judge" / "pairs.jsonl")]
    assert len(pairs) == j["prompts"] and {"question", "start", "tuned", "outcome", "margin"} <= set(pairs[0])
    assert "Classify the sentiment" in pairs[0]["question"] and "<|user|>" not in pairs[0]["question"]
    card = (Path(first["card"])).read_text()
    assert "## Generated answers judged against the start model" in card and "length-controlled" in card
    assert "Judged: tuned model vs start model" in (run_dir / "summary.md").read_text()

    # Unchanged: everything from the cache, the same figures.
    again = summary_of(demo())
    assert set(again["status"].values()) == {"cached"} and again["judge"] == j

    # A generation setting: the answers and the judgement again, no training, no forgetting check.
    longer = summary_of(demo("evaluate.judge.max_new_tokens=24"))
    ran = {s for s, v in longer["status"].items() if v == "ran"}
    assert ran == {"answers", "judge", "card"}, longer["status"]

    # The gate on the judge's figures (applied to the cached figures: nothing is re-judged).
    blocked = demo("evaluate.gate.max_length_growth=0.01", expect=1)
    line = failure_line(blocked.stderr)
    assert line.startswith("dpoflow: pipeline 'demo' failed: GateBlocked:") and "judge: answers grew" in line, line
    latest = demo.tmp / "work" / "runs" / "demo" / "latest"
    gated = json.loads((latest / "summary.json").read_text())
    assert not gated["forgetting"]["passed"] and gated["exports"] == {}
    assert {row["stage"]: row["status"] for row in gated["stages"]}["judge"] == "cached"


def test_prompts_file_is_judged_too_and_a_bad_row_is_one_line(demo, tmp_path):
    good = tmp_path / "prompts.jsonl"
    good.write_text(json.dumps({"prompt": "Classify the sentiment of this review as positive or negative.\n"
                                          "Review: The pizza was superb."}) + "\n")
    summary = summary_of(demo(f"evaluate.judge.prompts_file={good}"))
    assert summary["judge"]["prompts"] == summary["metrics"]["heldout_pairs"] + 1
    assert {s for s, v in summary["status"].items() if v == "ran"} == {"answers", "judge", "card"}

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"question": "no prompt"}) + "\n")
    proc = demo(f"evaluate.judge.prompts_file={bad}", expect=1)
    last = failure_line(proc.stderr)
    assert last == f"dpoflow: pipeline 'demo' failed: JudgeError: {bad}:2: field 'prompt': expected a non-empty " \
                   "string", last
    assert "Traceback" not in proc.stderr
