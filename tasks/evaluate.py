"""evaluate: did DPO help, and did the model forget anything?

1. Held-out preference accuracy of the model DPO started from vs the tuned model, and the tuned
   model's implicit DPO reward accuracy and margin. Held-out unpaired examples (thumbs-up/down data)
   have no pair to compare: for them the tuned model's implicit reward per label (`unpaired_metrics`),
   and the pair accuracy and the `dpoflow_preference` task are reported unavailable when no held-out
   pair exists, not made up.
2. The forgetting check: lm-evaluation-harness tasks (dpoflow/evals/ plus the held-out pairs as
   `dpoflow_preference`) on the start model (`start_scores_task`, cached by its content, so sweeps
   score it once) and on the tuned model. The gate (per-task allowed drops and required gains) is a
   policy applied to these cached scores on every run (`apply_gate`), so changing it re-scores
   nothing; the flow stops before export when it fails in enforce mode.
"""

from __future__ import annotations

import json
from pathlib import Path

from dpoflow.engine import forgetting
from dpoflow.base.artifacts import fresh_dir, read_rows, seal
from dpoflow.base.config import EvaluateSpec, GateSpec
from dpoflow.engine.models import load_model, load_tokenizer
from dpoflow.base.records import EvalReport, ModelRef, PreparedData, TaskScores, TrainedAdapter
from dpoflow.engine.scoring import completion_logps

from . import stage_task


def preference_metrics(chosen, rejected, ref_chosen, ref_rejected, beta: float) -> dict[str, float]:
    """`accuracy`: share of pairs where the model gives the chosen answer the higher log-prob.
    `reward_*`: DPO's implicit reward beta * (log p - log p_ref), chosen vs rejected."""
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return {
        "accuracy": (chosen > rejected).float().mean().item(),
        "reward_accuracy": (margin > 0).float().mean().item(),
        "reward_margin": margin.mean().item(),
    }


PAIRS_UNAVAILABLE = ("held-out preference accuracy: unavailable: the held-out rows are unpaired (prompt/completion/"
                     "label), so there is no pair of answers to compare; dpoflow_preference is not scored either. "
                     "The implicit reward per label is reported instead (tuned_kto_reward_accuracy, "
                     "tuned_desirable_reward, tuned_undesirable_reward)")


def unpaired_metrics(logps, ref_logps, labels, beta: float) -> dict[str, float]:
    """Held-out unpaired examples: the implicit reward beta * (log p - log p_ref) of each completion.
    `kto_reward_accuracy`: share whose reward has its label's sign (up for desirable, down for undesirable);
    the mean reward of each label, and their difference (`kto_reward_margin`)."""
    import torch

    reward = beta * (logps - ref_logps)
    liked = torch.tensor([bool(x) for x in labels])
    out = {"kto_reward_accuracy": ((reward > 0) == liked).float().mean().item()}
    if liked.any():
        out["desirable_reward"] = reward[liked].mean().item()
    if (~liked).any():
        out["undesirable_reward"] = reward[~liked].mean().item()
    if liked.any() and (~liked).any():
        out["kto_reward_margin"] = out["desirable_reward"] - out["undesirable_reward"]
    return out


def forgetting_tasks(spec: EvaluateSpec, data: PreparedData) -> list[str]:
    """The configured tasks, less `dpoflow_preference` when there is no held-out pair to make it from."""
    return [t for t in spec.tasks if t != forgetting.PREFERENCE_TASK or data.heldout_pairs > 0]


def score_tasks(model: ModelRef, adapter: TrainedAdapter | None, data: PreparedData, spec: EvaluateSpec,
                out_dir: Path) -> dict[str, float]:
    """lm-eval accuracy per configured task, written to `out_dir/scores.json`."""
    include = forgetting.materialize_tasks(out_dir / "tasks", heldout_pairs=data.heldout)
    scores = forgetting.run_tasks(model.path, adapter.path if adapter else None, forgetting_tasks(spec, data),
                                  include, limit=spec.limit, batch_size=spec.batch_size, device=_device())
    (out_dir / "scores.json").write_text(json.dumps(dict(scores), indent=1, sort_keys=True))
    return dict(scores)


def score_start_model(start: ModelRef, data: PreparedData, spec: EvaluateSpec, out_dir: Path) -> TaskScores:
    fresh_dir(out_dir)
    scores = score_tasks(start, None, data, spec, out_dir)
    return TaskScores(path=str(out_dir), digest=seal(out_dir), scores=scores)


def evaluate_model(base: ModelRef, adapter: TrainedAdapter, data: PreparedData, spec: EvaluateSpec,
                   start_scores: TaskScores, beta: float, max_length: int, out_dir: Path) -> EvalReport:
    from peft import PeftModel

    fresh_dir(out_dir)
    rows = read_rows(data.heldout)
    unpaired = read_rows(data.heldout_unpaired) if data.heldout_unpaired else []
    start = adapter.start
    tokenizer = load_tokenizer(start.path)
    model = PeftModel.from_pretrained(load_model(start.path, "float32"), adapter.path)
    model.to(_device())

    def score(m, items, fields=("chosen", "rejected")):
        return [completion_logps(m, tokenizer, [r["prompt"] for r in items], [r[k] for r in items], max_length,
                                 spec.batch_size) for k in fields]

    metrics, notes = {}, []
    if rows:
        tuned = score(model, rows)
        with model.disable_adapter():
            reference = score(model, rows)
        metrics = {f"tuned_{k}": v for k, v in preference_metrics(*tuned, *reference, beta).items()}
        metrics["start_accuracy"] = (reference[0] > reference[1]).float().mean().item()
        if base.digest != start.digest:  # SFT ran: also score the original base model
            base_scores = score(load_model(base.path, "float32").to(_device()), rows)
            metrics["base_accuracy"] = (base_scores[0] > base_scores[1]).float().mean().item()
    else:
        notes.append(PAIRS_UNAVAILABLE)
    metrics["heldout_pairs"] = float(len(rows))
    if unpaired:
        [tuned_logps] = score(model, unpaired, ("completion",))
        with model.disable_adapter():
            [reference_logps] = score(model, unpaired, ("completion",))
        found = unpaired_metrics(tuned_logps, reference_logps, [r["label"] for r in unpaired], beta)
        metrics.update({f"tuned_{k}": v for k, v in found.items()})
        metrics["heldout_unpaired"] = float(len(unpaired))
    del model

    tuned_scores = score_tasks(start, adapter, data, spec, out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return EvalReport(path=str(out_dir), digest=seal(out_dir), metrics=metrics, base_scores=start_scores.scores,
                      tuned_scores=tuned_scores, notes=notes)


def apply_gate(report: EvalReport, spec: GateSpec):
    """The forgetting check's verdict on a report's scores (start model vs tuned). A gain required of
    `dpoflow_preference` when there was no held-out pair fails, saying so rather than "no score"."""
    verdict = forgetting.gate(report.base_scores, report.tuned_scores, spec.max_drop, spec.per_task_max_drop,
                              spec.required_gain)
    if report.metrics.get("heldout_pairs", 1) == 0:
        task = forgetting.PREFERENCE_TASK
        verdict.failures = [f"{task}: not scored: the held-out rows are unpaired, with no pair to compare; remove "
                            f"it from evaluate.gate.required_gain" if f.startswith(f"{task}: no ") else f
                            for f in verdict.failures]
    return verdict


def write_gate_report(verdict, folder: Path) -> None:
    """forgetting.md (base vs tuned with deltas and the verdict), forgetting.png and gate.json."""
    (folder / "forgetting.md").write_text("# Forgetting check: start model vs tuned\n\n"
                                          + forgetting.report_markdown(verdict))
    forgetting.report_chart(verdict, folder / "forgetting.png")
    (folder / "gate.json").write_text(json.dumps({"passed": verdict.passed, "failures": verdict.failures,
                                                  "rows": verdict.rows}, indent=1))


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluation_items(inputs: dict) -> dict:
    """What the scores depend on beyond the arguments: the items of dpoflow's own tasks."""
    return {"evals": forgetting.tasks_digest()}


@stage_task(stage="baseline", depends_on=evaluation_items)
def start_scores_task(out_dir: str, start: ModelRef, data: PreparedData,
                      spec: EvaluateSpec) -> TaskScores:
    return score_start_model(start, data, spec, Path(out_dir))


@stage_task(depends_on=evaluation_items)
def evaluate_task(out_dir: str, base: ModelRef, adapter: TrainedAdapter,
                  data: PreparedData, spec: EvaluateSpec, start_scores: TaskScores, beta: float,
                  max_length: int) -> EvalReport:
    return evaluate_model(base, adapter, data, spec, start_scores, beta, max_length, Path(out_dir))
