"""A stage's cache key is derived from the arguments it is called with: changing any field a stage is
given re-runs that stage and the stages after it that take its output, and nothing else; a field no
stage's key holds (the gate, a retry count) re-runs nothing but the model card, which shows the whole
config. `explain` (what would run, from the same wiring and keys as the flow) checks the whole table
against one cached demo run; a few rows are also run for real, through the CLI."""

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# The demo, short: a few steps are enough to make every stage's output, and a warn-mode gate lets a
# forecast go past the forgetting check whatever the few steps score.
FAST = ["dpo.precompute_ref_log_probs=true", "sft.max_steps=2", "dpo.max_steps=4", "evaluate.limit=10",
        "evaluate.gate.mode=warn"]
STAGES = ["model", "prepare", "sft", "reference", "dpo", "baseline", "evaluate", "answers", "judge", "export",
          "card"]
AFTER_MODEL = set(STAGES) - {"model"}
AFTER_SFT = AFTER_MODEL - {"prepare"}  # sft, and all that starts from its model (its answers too)
AFTER_DPO = {"dpo", "evaluate", "judge", "export", "card"}  # the start model's answers are kept
SCORES = {"baseline", "evaluate", "card"}

# (field, new value, the stages that run again)
CHANGES = [
    ("model.source", "builtin:tiny-llama-256", set(STAGES)),
    ("data.heldout_fraction", "0.2", AFTER_MODEL),
    ("data.decontamination.ngram", "14", AFTER_MODEL),
    ("data.min_margin", "0.5", AFTER_MODEL),
    ("dpo.max_length", "96", AFTER_MODEL),  # prepare drops the pairs longer than it
    ("evaluate.tasks", "[dpoflow_knowledge,dpoflow_preference]", AFTER_MODEL),  # prepare decontaminates against them
    ("seed", "7", AFTER_SFT),
    ("train.grow_batch", "false", AFTER_SFT),
    ("sft.learning_rate", "1.0e-4", AFTER_SFT),
    ("sft.lora.r", "8", AFTER_SFT),
    ("dpo.share_prompt", "false", {"reference"} | AFTER_DPO),
    ("dpo.lora.alpha", "16", {"reference"} | AFTER_DPO),
    ("dpo.beta", "0.2", AFTER_DPO),  # the reference pass does not depend on it: a beta sweep shares it
    ("dpo.learning_rate", "5.0e-4", AFTER_DPO),
    ("dpo.loss_type", "[sigmoid,sft]", AFTER_DPO),
    ("dpo.guards.max_retries", "1", AFTER_DPO),
    ("evaluate.batch_size", "8", SCORES),
    ("evaluate.limit", "12", SCORES),
    ("export.dtype", "float32", {"export", "card"}),
    # In no stage's key: only the card, which shows the whole config, is written again.
    ("evaluate.gate.max_drop", "50", {"card"}),
    ("publish.max_attempts", "2", {"card"}),
    ("cpu_threads", "2", {"card"}),
    ("description", "another", {"card"}),
    # The card names the tracker and experiment, never where the tracker is or the run's tags.
    ("tracking.experiment", "another", {"card"}),
    ("tracking.uri", "sqlite:///elsewhere.db", set()),
    ("tracking.tags", "{team: nlp}", set()),
]
REAL = ["dpo.share_prompt", "evaluate.batch_size", "publish.max_attempts"]


@pytest.fixture(scope="module")
def cached_demo(repo, tmp_path_factory):
    """A workdir holding one run of the short demo; `run(*items)` runs it again with --set items and
    returns {stage: status}."""
    tmp = tmp_path_factory.mktemp("keys")
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    base = [f"workdir={tmp / 'work'}", *FAST]

    def run(*items: str) -> dict[str, str]:
        cmd = ["python", "-m", "dpoflow", "run", "demo", "-f", str(repo / "pipelines.yaml")]
        for item in (*base, *items):
            cmd += ["--set", item]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        run_dir = next(line.split(":", 1)[1].strip() for line in proc.stdout.splitlines()
                       if line.startswith("run folder:"))
        return {row["stage"]: row["status"] for row in json.loads((Path(run_dir) / "summary.json").read_text())["stages"]}

    first = run()
    assert list(first) == STAGES and set(first.values()) == {"ran"}
    run.items = base
    return run


def forecast(repo, base: list[str], *items: str) -> dict[str, str]:
    from dpoflow.base.config import load_pipeline
    from dpoflow.flows.explain import explain

    result = explain(load_pipeline("demo", repo / "pipelines.yaml", [*base, *items]))
    return {f.stage: f.verdict for f in result["forecasts"]}


def test_the_same_config_is_all_cached(repo, cached_demo):
    assert forecast(repo, cached_demo.items) == dict.fromkeys(STAGES, "cached")


@pytest.mark.parametrize(("field", "value", "runs"), CHANGES, ids=[c[0] for c in CHANGES])
def test_a_changed_field_reruns_its_stage_and_what_follows_only(repo, cached_demo, field, value, runs):
    verdicts = forecast(repo, cached_demo.items, f"{field}={value}")
    assert list(verdicts) == STAGES
    assert {stage for stage, verdict in verdicts.items() if verdict == "runs"} == runs, verdicts
    assert {verdicts[stage] for stage in set(STAGES) - runs} <= {"cached"}


@pytest.mark.parametrize(("field", "value", "runs"), [c for c in CHANGES if c[0] in REAL], ids=REAL)
def test_a_real_rerun_runs_what_explain_said(cached_demo, field, value, runs):
    status = cached_demo(f"{field}={value}")
    assert {stage for stage, s in status.items() if s == "ran"} == runs, status
    assert {s for stage, s in status.items() if stage not in runs} == {"cached"}


# The objective (dpo.method) and its knobs are the dpo stage's. A reference-free method has no reference
# pass (the precomputed one is DPO's, so it is switched off with it); ORPO trains the SFT term itself, so
# it starts from the base model, whose scores and answers are new (the cached run started from SFT's).
NO_REFERENCE = "dpo.precompute_ref_log_probs=false"
METHOD_CHANGES = [
    ("dpo.method=simpo", [s for s in STAGES if s != "reference"], AFTER_DPO),
    ("dpo.method=orpo", [s for s in STAGES if s not in ("sft", "reference")], AFTER_DPO | {"baseline", "answers"}),
]
SIMPO_KNOBS = [("dpo.simpo_gamma", "1.0"), ("dpo.beta", "2.0")]


@pytest.mark.parametrize(("item", "stages", "runs"), METHOD_CHANGES, ids=[c[0] for c in METHOD_CHANGES])
def test_a_changed_method_reruns_dpo_and_what_follows_only(repo, cached_demo, item, stages, runs):
    verdicts = forecast(repo, cached_demo.items, NO_REFERENCE, item)
    assert list(verdicts) == stages
    assert {stage for stage, verdict in verdicts.items() if verdict == "runs"} == runs, verdicts
    assert {verdicts[stage] for stage in set(stages) - runs} == {"cached"}


@pytest.fixture(scope="module")
def cached_simpo(cached_demo):
    """The short demo trained with SimPO, for real: what explain said about the method change, and the
    cached run the knobs below are compared with."""
    status = cached_demo(NO_REFERENCE, "dpo.method=simpo")
    assert list(status) == METHOD_CHANGES[0][1]
    assert {stage for stage, s in status.items() if s == "ran"} == AFTER_DPO, status
    return [*cached_demo.items, NO_REFERENCE, "dpo.method=simpo"]


@pytest.mark.parametrize(("field", "value"), SIMPO_KNOBS, ids=[k[0] for k in SIMPO_KNOBS])
def test_a_changed_method_knob_reruns_dpo_and_what_follows_only(repo, cached_simpo, field, value):
    verdicts = forecast(repo, cached_simpo, f"{field}={value}")
    assert {stage for stage, verdict in verdicts.items() if verdict == "runs"} == AFTER_DPO, verdicts
    assert forecast(repo, cached_simpo) == dict.fromkeys(verdicts, "cached")
