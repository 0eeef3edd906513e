"""evaluate: held-out preference accuracy of the model DPO started from vs the tuned model, and the
tuned model's implicit DPO reward accuracy and margin. (The lm-evaluation-harness forgetting check
and its gate plug in here.)"""

from __future__ import annotations

import json
from pathlib import Path

from dpoflow.artifacts import fresh_dir, read_jsonl_rows, seal
from dpoflow.config import EvaluateSpec
from dpoflow.models import load_model, load_tokenizer
from dpoflow.records import EvalReport, ModelRef, PreparedData, TrainedAdapter
from dpoflow.scoring import completion_logps

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


def evaluate_preferences(base: ModelRef, adapter: TrainedAdapter, data: PreparedData, spec: EvaluateSpec,
                         beta: float, max_length: int, out_dir: Path) -> EvalReport:
    from peft import PeftModel

    fresh_dir(out_dir)
    rows = read_jsonl_rows(data.heldout)
    prompts = [r["prompt"] for r in rows]
    start = adapter.start
    tokenizer = load_tokenizer(start.path)
    model = PeftModel.from_pretrained(load_model(start.path, "float32"), adapter.path)
    model.to(_device())

    def score(m):
        return [completion_logps(m, tokenizer, prompts, [r[k] for r in rows], max_length, spec.batch_size)
                for k in ("chosen", "rejected")]

    tuned = score(model)
    with model.disable_adapter():
        reference = score(model)
    metrics = {f"tuned_{k}": v for k, v in preference_metrics(*tuned, *reference, beta).items()}
    metrics["start_accuracy"] = (reference[0] > reference[1]).float().mean().item()
    if base.digest != start.digest:  # SFT ran: also score the original base model
        base_scores = score(load_model(base.path, "float32").to(_device()))
        metrics["base_accuracy"] = (base_scores[0] > base_scores[1]).float().mean().item()
    metrics["heldout_pairs"] = float(len(rows))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return EvalReport(path=str(out_dir), digest=seal(out_dir), metrics=metrics)


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@stage_task
def evaluate_task(stage: str, key: str, out_dir: str, base: ModelRef, adapter: TrainedAdapter,
                  data: PreparedData, spec: EvaluateSpec, beta: float, max_length: int) -> EvalReport:
    return evaluate_preferences(base, adapter, data, spec, beta, max_length, Path(out_dir))
