"""A sweep: one pipeline run once per combination of a few varied fields (`--vary dpo.beta=0.05,0.1`),
in one flow run. Each variant is exactly the pipeline with its `--set` items, so it caches, records and
can be re-run alone like any run; the sweep flow (flows/sweep.py) only orders the variants so that their
DPO stages run back to back on one loaded model."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dpoflow.base.config import DEFAULT_FILE, REFERENCE_FREE, ConfigError, PipelineConfig, load_pipeline

MAX_VARIANTS = 64


@dataclass(frozen=True)
class Variant:
    label: str              # "dpo.beta=0.05 dpo.learning_rate=1e-05"
    items: list[str]        # its --set items, after the sweep's common ones
    config: PipelineConfig


def parse_vary(item: str) -> tuple[str, list[Any]]:
    """`dpo.beta=0.05,0.1` -> ("dpo.beta", [0.05, 0.1]). The values are a YAML flow sequence without its
    brackets, so a list value is `[sigmoid],[sigmoid,sft]`."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip() or not raw.strip():
        raise ConfigError([f"--vary {item!r}: expected KEY.PATH=VALUE1,VALUE2,..."])
    try:
        values = yaml.safe_load(f"[{raw}]")
    except yaml.YAMLError as e:
        raise ConfigError([f"--vary {item!r}: values are not valid YAML ({e.problem})"]) from None
    values = [_yaml_1_2_number(v) for v in values]
    if len(values) != len({json.dumps(v, sort_keys=True) for v in values}):
        raise ConfigError([f"--vary {item!r}: a value is given twice"])
    return key.strip(), values


def _yaml_1_2_number(value: Any) -> Any:
    """PyYAML reads `5e-4` (no dot) as a string; YAML 1.2, and users, mean a number."""
    if isinstance(value, str):
        try:
            return float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "+inf") else value
        except ValueError:
            pass
    return value


def plan_sweep(name: str, vary: list[str], file: str | Path = DEFAULT_FILE, overrides: list[str] = ()) -> list[Variant]:
    """Every combination of the varied fields as a loaded, checked pipeline config; a ConfigError lists
    every variant's problems."""
    axes = [parse_vary(item) for item in vary]
    if not axes:
        raise ConfigError(["a sweep needs at least one --vary KEY=VALUE1,VALUE2,..."])
    keys = [key for key, _ in axes]
    if len(set(keys)) != len(keys):
        raise ConfigError([f"--vary: {key} is varied twice" for key in sorted({k for k in keys if keys.count(k) > 1})])
    combos = list(itertools.product(*(values for _, values in axes)))
    if len(combos) > MAX_VARIANTS:
        raise ConfigError([f"--vary: {len(combos)} combinations; a sweep runs at most {MAX_VARIANTS}"])
    variants, problems = [], []
    for combo in combos:
        items = [f"{key}={json.dumps(value)}" for key, value in zip(keys, combo)]
        label = " ".join(f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                         for key, value in zip(keys, combo))
        try:
            config = load_pipeline(name, file, [*overrides, *items])
        except ConfigError as e:
            problems += [f"variant {label}: {p}" for p in e.problems]
            continue
        if config.publish.enabled:
            problems.append(
                f"variant {label}: publish.enabled: every variant would push to {config.publish.repo_id}. Sweep "
                f"with --set publish.enabled=false, then publish the chosen one with `dpoflow run {name} --set "
                "...` (its stages come from the sweep's cache)")
        variants.append(Variant(label, items, config))
    if problems:
        raise ConfigError(problems)
    return variants


def comparison_row(variant: Variant, summary: dict[str, Any]) -> dict[str, Any]:
    """One line of the sweep's table: the variant, its training end point, held-out and forgetting."""
    dpo = next((row for row in summary["stages"] if row["stage"] == "dpo"), {})
    metrics, forgetting = summary.get("metrics") or {}, summary.get("forgetting")
    deltas = [row["delta"] for row in forgetting["table"] if row.get("gain") is None] if forgetting else []
    judge = summary.get("judge") or {}
    return {
        "variant": variant.label,
        "method": variant.config.dpo.method,
        "dpo_loss": summary.get("dpo_metrics", {}).get("loss"),
        "train_reward_accuracy": summary.get("dpo_metrics", {}).get("rewards/accuracies"),
        "heldout_accuracy": metrics.get("tuned_accuracy"),
        "heldout_reward_margin": metrics.get("tuned_reward_margin", metrics.get("tuned_kto_reward_margin")),
        "worst_forgetting_points": min(deltas) if deltas else None,
        "judged_win_rate": judge.get("win_rate"),
        "judged_lc_win_rate": judge.get("lc_win_rate"),
        "gate": None if forgetting is None else ("passed" if forgetting["passed"] else "FAILED"),
        "dpo_stage": dpo.get("status"),
        "run_dir": summary["run_dir"],
        "exports": summary.get("exports") or {},
    }


def comparison_markdown(pipeline: str, rows: list[dict[str, Any]], notes: list[str] = ()) -> str:
    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    head = ["variant", "method", "dpo loss", "train reward acc", "held-out acc", "held-out margin",
            "worst forgetting (points)", "judged win rate", "length-controlled", "gate", "dpo stage"]
    fields = ["variant", "method", "dpo_loss", "train_reward_accuracy", "heldout_accuracy", "heldout_reward_margin",
              "worst_forgetting_points", "judged_win_rate", "judged_lc_win_rate", "gate", "dpo_stage"]
    lines = [f"# Sweep of {pipeline}: {len(rows)} variants", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(r["error"] if "error" in r and f == "dpo_loss" else r.get(f)) for f in fields)
              + " |" for r in rows]
    methods = {r.get("method") for r in rows} - {None}
    if len(methods) > 1:
        notes = [*notes, "the objectives' losses are on different scales (ORPO's includes the SFT loss): compare "
                         "the methods by the held-out and judged columns"]
    if methods & set(REFERENCE_FREE):
        notes = [*notes, "held-out margin: DPO's implicit reward margin against the start model, beta x log-ratio; "
                         "for orpo and simpo, whose beta is no such weight, the log-ratio itself (nats)"]
    if "kto" in methods:
        notes = [*notes, "kto: TRL's KTO logs no train reward accuracy; with unpaired held-out data there is no "
                         "held-out pair accuracy, and the held-out margin is the mean implicit reward of the "
                         "desirable completions minus that of the undesirable ones"]
    lines += ["", *[f"- {note}" for note in notes], "", "Each variant's run folder (summary, stage links, forgetting table) is under this folder; "
              "re-run or publish one with `dpoflow run " + pipeline + " --set ...` and its items."]
    return "\n".join(lines) + "\n"
