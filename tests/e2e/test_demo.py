"""The demo pipeline end to end on CPU, through the CLI as a user runs it: it learns, a re-run is fully
cached, a changed hyper-parameter re-runs only what depends on it, and altered outputs are rebuilt."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from cli_runs import demo_command

pytestmark = pytest.mark.slow
STAGES = ["model", "prepare", "sft", "dpo", "baseline", "evaluate", "answers", "judge", "export", "card"]


@pytest.fixture(scope="module")
def demo(repo, demo_home):
    def run(*overrides: str, expect: int = 0) -> dict:
        """Runs the demo through the CLI; returns its summary.json, or {"stderr"} when it must fail."""
        cmd, env = demo_command(repo, demo_home, *overrides)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-5000:]
        if expect:
            return {"stderr": proc.stderr, "output": proc.stdout + proc.stderr,
                    "latest": demo_home / "work" / "runs" / "demo" / "latest"}
        return summary_of(proc)

    run.tmp = demo_home
    return run


def summary_of(proc: subprocess.CompletedProcess) -> dict:
    assert "dpoflow: pipeline 'demo' finished" in proc.stdout
    summary = json.loads((Path(_run_dir(proc.stdout)) / "summary.json").read_text())
    summary["status"] = {row["stage"]: row["status"] for row in summary["stages"]}
    summary["output"] = proc.stdout + proc.stderr
    return summary


def _run_dir(stdout: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in stdout.splitlines() if line.startswith("run folder:"))


def test_demo_learns_then_caches_then_reruns_only_what_changed(demo, demo_first_run):
    first = summary_of(demo_first_run)
    assert list(first["status"]) == STAGES
    assert first["plans"]["dpo"]["precision"] == "fp32" and first["backend"]["name"] == "trl"
    assert set(first["status"].values()) == {"ran"}
    m = first["metrics"]
    assert m["tuned_accuracy"] >= 0.9
    assert m["tuned_accuracy"] > m["start_accuracy"] and m["tuned_accuracy"] > m["base_accuracy"]
    assert m["tuned_reward_accuracy"] >= 0.9 and m["tuned_reward_margin"] > 0
    assert first["reference"].startswith("sft model")
    merged = Path(first["exports"]["merged"])
    assert (merged / "model.safetensors").is_file() and (merged / "chat_template.jinja").is_file()
    assert (Path(first["run_dir"]) / "dpo" / "adapter" / "adapter_config.json").is_file()

    # A stray file beside a stage's outputs (a desktop's .DS_Store) is not a change: nothing reruns.
    for row in first["stages"]:
        (Path(row["output"]) / ".DS_Store").write_bytes(b"")
    second = demo()
    assert set(second["status"].values()) == {"cached"}
    assert all(re.search(rf"^{stage}\s+cached\s", second["output"], re.M) for stage in STAGES), second["output"]
    assert second["metrics"] == m
    assert sum(row["seconds"] for row in second["stages"]) < 10

    beta = demo("dpo.beta=0.2")
    assert beta["status"] == {"model": "cached", "prepare": "cached", "sft": "cached", "dpo": "ran",
                              "baseline": "cached", "evaluate": "ran", "answers": "cached", "judge": "ran",
                              "export": "ran", "card": "ran"}

    # An altered artifact behind a cache hit is a miss: the stage runs again and restores it.
    weights = Path(beta["exports"]["merged"]) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    repaired = demo("dpo.beta=0.2")
    assert repaired["status"]["export"] == "ran"
    assert {s for s, v in repaired["status"].items() if v == "ran"} == {"export"}


def test_bad_data_fails_the_run_naming_file_line_and_field(demo, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    out = demo(f"data.sources=[{bad}]", "data.on_error=fail", expect=1)
    assert f"{bad}:2: field 'rejected': missing" in out["stderr"]
    assert "Traceback" not in out["output"]


def test_a_stage_failing_for_a_reason_the_user_can_fix_says_it_in_one_line_without_a_traceback(demo):
    # The built-in tokenizer's pre-tokenizer is one llama.cpp's converter cannot recognise by itself.
    out = demo("export.formats=[adapter,gguf]", "export.gguf_types=[q8_0]", expect=1)
    assert "dpoflow: pipeline 'demo' failed: GGUFError: llama.cpp's converter does not know this " \
           "tokenizer's pre-tokenizer; if it is a standard one, set export.gguf_pre_tokenizer" in out["stderr"]
    assert "Traceback" not in out["output"], out["output"][-3000:]


def test_a_beta_sweep_pays_the_precomputed_reference_pass_once(demo):
    first = demo("dpo.precompute_ref_log_probs=true")
    assert first["status"]["reference"] == "ran" and first["status"]["sft"] == "cached"
    assert "precomputed once" in first["reference"]
    assert first["metrics"]["tuned_accuracy"] >= 0.9
    second = demo("dpo.precompute_ref_log_probs=true", "dpo.beta=0.3", "dpo.loss_type=[sigmoid,sft]",
                  "dpo.loss_weights=[1.0,0.1]")
    assert second["status"]["reference"] == "cached"
    assert second["status"]["dpo"] == "ran"


def test_a_sweep_trains_its_variants_on_one_loaded_model_and_each_equals_its_own_run(demo, repo):
    common = ["dpo.precompute_ref_log_probs=true", "evaluate.limit=20"]
    env = {**os.environ, "PREFECT_HOME": str(demo.tmp / "prefect"), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    cmd = ["python", "-m", "dpoflow", "sweep", "demo", "-f", str(repo / "pipelines.yaml"), "--vary",
           "dpo.beta=0.15,0.25", "--set", f"workdir={demo.tmp / 'work'}"]
    for item in common:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    sweep_dir = Path(next(line.split(":", 1)[1].strip() for line in proc.stdout.splitlines()
                          if line.startswith("sweep folder:")))
    result = json.loads((sweep_dir / "sweep.json").read_text())
    rows = result["variants"]
    assert [r["variant"] for r in rows] == ["dpo.beta=0.15", "dpo.beta=0.25"]
    assert [r["dpo_stage"] for r in rows] == ["ran", "ran"] and {r["gate"] for r in rows} == {"passed"}
    assert all(r["heldout_accuracy"] >= 0.9 for r in rows)
    # Both DPO stages (and the reference pass, if it ran) trained on the model loaded once.
    assert result["training_model"]["loads"] == 1 and result["training_model"]["reuses"] >= 1
    assert "| dpo.beta=0.15 |" in (sweep_dir / "sweep.md").read_text()
    variant = json.loads((sweep_dir / "v2" / "summary.json").read_text())
    assert variant["overrides"][-1] == "dpo.beta=0.25" and variant["exports"]["merged"]
    # Each variant is judged; the start model's answers are generated once (by the first run of this
    # module: same start model, data and generation settings).
    for v in ("v1", "v2"):
        status = {r["stage"]: r["status"] for r in json.loads((sweep_dir / v / "summary.json").read_text())["stages"]}
        assert (status["answers"], status["judge"]) == ("cached", "ran"), status

    # A variant is the pipeline with its items: run alone, every stage is the sweep's, from the cache.
    alone = demo(*common, "dpo.beta=0.25")
    assert set(alone["status"].values()) == {"cached"}
    assert alone["metrics"] == variant["metrics"]


def test_a_failed_sweep_variant_is_reported_and_the_others_finish(demo, repo):
    env = {**os.environ, "PREFECT_HOME": str(demo.tmp / "prefect"), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    cmd = ["python", "-m", "dpoflow", "sweep", "demo", "-f", str(repo / "pipelines.yaml"), "--vary",
           "model.source=builtin:no-such-model,builtin:tiny-llama", "--set", f"workdir={demo.tmp / 'work'}",
           "--set", "sft.enabled=false", "--set", "dpo.max_steps=4", "--set", "evaluate.limit=10",
           "--set", "evaluate.gate.mode=warn"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "1 of 2 variants failed: model.source=builtin:no-such-model: " in proc.stderr
    sweep_dir = Path(proc.stderr.split("(table: ")[1].split(")")[0]).parent
    rows = json.loads((sweep_dir / "sweep.json").read_text())["variants"]
    assert "no-such-model" in rows[0]["error"] and rows[0]["run_dir"] is None
    assert rows[1]["dpo_stage"] == "ran" and rows[1]["heldout_accuracy"] is not None
    assert "| model.source=builtin:no-such-model | " in (sweep_dir / "sweep.md").read_text()


def test_the_forgetting_gate_blocks_export_when_enforced_and_only_reports_in_warn_mode(demo):
    impossible = "evaluate.gate.required_gain={dpoflow_preference: 90}"  # the demo gains ~41 points
    blocked = demo(impossible, expect=1)
    assert "forgetting check failed, export skipped: dpoflow_preference: moved +" in blocked["stderr"]
    assert "Traceback" not in blocked["output"]
    summary = json.loads((blocked["latest"] / "summary.json").read_text())
    assert summary["exports"] == {} and "export" not in {row["stage"] for row in summary["stages"]}
    assert summary["forgetting"]["passed"] is False
    table = (blocked["latest"] / "forgetting.md").read_text()
    assert "| dpoflow_preference |" in table and "FAILED" in table
    assert (blocked["latest"] / "forgetting.png").stat().st_size > 1000

    warned = demo(impossible, "evaluate.gate.mode=warn")
    assert warned["forgetting"]["passed"] is False
    # The gate is policy on cached scores: nothing retrains; only the card, which shows the verdict, is new.
    assert {s for s, v in warned["status"].items() if v == "ran"} == {"card"}
    assert warned["exports"]["merged"]


def test_sft_and_dpo_run_data_parallel_on_two_processes_launched_from_the_tasks(demo, repo):
    settings = ["train.distributed.num_processes=2", "train.grow_batch=false", "evaluate.limit=20"]
    two = demo(*settings)
    assert two["status"]["sft"] == "ran" and two["status"]["dpo"] == "ran"
    assert two["plans"]["dpo"]["num_processes"] == 2 and two["plans"]["dpo"]["gradient_accumulation_steps"] == 1
    # The ranks' own lines reach the Prefect task's log.
    for stage in ("train_sft", "train_dpo"):
        assert f"dpoflow rank 1 of 2: {stage}" in two["output"]
    assert two["metrics"]["tuned_reward_accuracy"] >= 0.9

    # `dpoflow doctor` with the same settings prints exactly the plans the run recorded.
    from textwrap import indent

    from dpoflow.base.hardware import TrainingPlan, describe

    cmd = ["python", "-m", "dpoflow", "doctor", "demo", "-f", str(repo / "pipelines.yaml")]
    proc = subprocess.run(cmd + [arg for item in settings for arg in ("--set", item)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(two["plans"]) == {"sft", "dpo"}
    for stage, plan in two["plans"].items():
        assert f"plan for the {stage} stage" in proc.stdout
        assert indent(describe(TrainingPlan(**plan)), "  ") in proc.stdout, proc.stdout


def test_prepare_alone_prints_the_report_and_leaves_it_in_the_run_folder(repo, tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(["python", "-m", "dpoflow", "prepare", "demo", "-f", str(repo / "pipelines.yaml"),
                           "--set", f"workdir={tmp_path / 'work'}"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## Data: 640 items read" in proc.stdout
    report_path = next(line.split(":", 1)[1].strip() for line in proc.stdout.splitlines()
                       if line.startswith("report:"))
    report = json.loads(Path(report_path).read_text())
    assert Path(report_path).parent.parent.name == "demo"  # runs/demo/<run>/data_report.json
    c = report["counts"]
    assert c["read"] == c["train"] + c["heldout"] + c["rejected"] and c["train"] > 400
    assert report["decontamination"]["checked_against"][0] == "held-out split"
