"""The forgetting check: score the base and the tuned model on small multiple-choice tasks with
lm-evaluation-harness, then gate on how far each task may drop (and on gains a run must show).

Plain functions, importable without Prefect; lm_eval and matplotlib are imported where used.
The local tasks (dpoflow/evals/) and the held-out preference pairs need no network. Registry tasks
(hellaswag, arc_easy, ...) download their data from the Hugging Face Hub: they need the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

EVALS_DIR = Path(__file__).resolve().parents[1] / "evals"
LOCAL_TASKS = ["dpoflow_knowledge", "dpoflow_arithmetic", "dpoflow_reading", "dpoflow_instructions"]
PREFERENCE_TASK = "dpoflow_preference"
EPS = 1e-9  # scores are shares of items times 100: a drop of exactly the limit must not fail on float noise


def tasks_digest() -> str:
    """Content of the shipped task data and templates: part of the evaluate stages' cache keys."""
    from dpoflow.base.artifacts import folder_digest

    return folder_digest(EVALS_DIR)


def materialize_tasks(out_dir: str | Path, heldout_pairs: str | Path | None = None) -> Path:
    """Write the task YAMLs into `out_dir` with absolute data paths, plus `dpoflow_preference` when
    `heldout_pairs` (Parquet or JSONL of rendered {prompt, chosen, rejected}) is given. Returns the folder to
    pass as include_path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {f"dpoflow_{name}": str(EVALS_DIR / f"{name}.jsonl") for name in
            ("knowledge", "arithmetic", "reading", "instructions")}
    if heldout_pairs is not None:
        data[PREFERENCE_TASK] = str(Path(heldout_pairs).resolve())
    for task, path in data.items():
        config = yaml.safe_load((EVALS_DIR / f"{task}.yaml.tmpl").read_text(encoding="utf-8"))
        # Set through the parsed YAML, not text substitution, so any path survives quoting.
        config["dataset_kwargs"]["data_files"]["test"] = path
        if path.endswith(".parquet"):
            config["dataset_path"] = "parquet"
        (out / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True),
                                          encoding="utf-8")
    return out


class Scores(dict):
    """{task: acc in percentage points}; `.samples` holds {task: number of items scored}."""

    samples: dict[str, int]


def run_tasks(model_path: str, adapter_path: str | None, tasks: list[str], include_path: Path | None,
              limit: int | None = None, batch_size: int = 16, device: str = "cpu") -> Scores:
    """Accuracy (0-100) per task of the model at `model_path`, with the LoRA adapter at `adapter_path`
    applied when given. Local tasks load from `include_path` (materialize_tasks); any other name is
    looked up in lm-eval's registry, which indexes ~14,700 tasks (~30 s) and needs the network."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path), include_defaults=False) if include_path else None
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=str(include_path) if include_path else None)
    model_args = {"pretrained": str(model_path), "dtype": "float32"}
    if adapter_path:
        model_args["peft"] = str(adapter_path)
    # `device` goes to simple_evaluate only: also putting it in model_args raises a TypeError.
    out = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=list(tasks), task_manager=manager,
                                  limit=limit, batch_size=batch_size, device=device, bootstrap_iters=0,
                                  log_samples=False)
    scores = Scores()
    scores.samples = {}
    for task in tasks:
        metrics = out["results"][task]
        acc = metrics.get("acc,none", metrics.get("acc_norm,none"))
        if acc is None:
            raise KeyError(f"{task}: lm-eval reported neither acc nor acc_norm ({sorted(metrics)})")
        scores[task] = 100.0 * acc
        if task in out["n-samples"]:  # groups (mmlu, ...) have no count of their own
            scores.samples[task] = int(out["n-samples"][task]["effective"])
    return scores


@dataclass
class GateResult:
    passed: bool
    rows: list[dict] = field(default_factory=list)  # task, base, tuned, delta, limit, gain, ok
    failures: list[str] = field(default_factory=list)


def gate(base: dict[str, float], tuned: dict[str, float], max_drop: float = 2.0,
         per_task_max_drop: dict[str, float] | None = None,
         required_gain: dict[str, float] | None = None) -> GateResult:
    """A task fails when tuned < base - limit (limit: its per-task max drop, else `max_drop`, in
    percentage points); a task in `required_gain` also fails when tuned - base < its gain. A task
    scored on one side only fails too: a missing score is not a pass."""
    per_task_max_drop, required_gain = per_task_max_drop or {}, required_gain or {}
    rows, failures = [], []
    for task in dict.fromkeys([*base, *tuned, *required_gain]):  # in the order the tasks ran
        limit, gain = per_task_max_drop.get(task, max_drop), required_gain.get(task)
        b, t = base.get(task), tuned.get(task)
        if b is None or t is None:
            side = "base" if b is None else "tuned"
            failures.append(f"{task}: no {side} score")
            rows.append(dict(task=task, base=b, tuned=t, delta=None, limit=limit, gain=gain, ok=False))
            continue
        delta, ok = t - b, True
        if delta < -limit - EPS:
            failures.append(f"{task}: dropped {-delta:.1f} points ({b:.1f} -> {t:.1f}), more than {limit:g} allowed")
            ok = False
        if gain is not None and delta < gain - EPS:
            failures.append(f"{task}: moved {delta:+.1f} points ({b:.1f} -> {t:.1f}), at least {gain:+g} required")
            ok = False
        rows.append(dict(task=task, base=b, tuned=t, delta=delta, limit=limit, gain=gain, ok=ok))
    return GateResult(passed=not failures, rows=rows, failures=failures)


def report_markdown(result: GateResult) -> str:
    def num(x, fmt=".1f"):
        return "-" if x is None else format(x, fmt)

    lines = ["| task | base | tuned | delta | allowed | ok |", "|---|---:|---:|---:|---|---|"]
    for r in result.rows:
        allowed = f"drop <= {r['limit']:g}" + (f", gain >= {r['gain']:g}" if r["gain"] is not None else "")
        lines.append(f"| {r['task']} | {num(r['base'])} | {num(r['tuned'])} | {num(r['delta'], '+.1f')} | "
                     f"{allowed} | {'yes' if r['ok'] else '**no**'} |")
    verdict = "**PASSED**" if result.passed else "**FAILED**: " + "; ".join(result.failures)
    return "\n".join(lines) + f"\n\nForgetting check {verdict}\n"


def report_chart(result: GateResult, png_path: str | Path) -> Path:
    """Grouped bars, base vs tuned accuracy per task; failed tasks are marked in the labels."""
    import numpy as np
    # Figure + savefig draws with Agg without touching pyplot's global backend or window state.
    from matplotlib.figure import Figure

    rows = result.rows
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(4.0, 1.3 * len(rows) + 1.5), 3.6), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(x - 0.2, [r["base"] or 0 for r in rows], 0.4, label="base", color="#9aa5b1")
    ax.bar(x + 0.2, [r["tuned"] or 0 for r in rows], 0.4, label="tuned", color="#2f6fdf")
    ax.set_xticks(x, [r["task"].removeprefix("dpoflow_") + ("" if r["ok"] else "\n(failed)") for r in rows],
                  fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Forgetting check: " + ("passed" if result.passed else "FAILED"))
    ax.legend(loc="upper right", fontsize=8)
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    return png_path
