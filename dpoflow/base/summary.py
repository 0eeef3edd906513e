"""The run summary: one row per stage (ran or cached, seconds, key metric), as text and markdown."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dpoflow.base.records import (Answers, EvalReport, Exports, JudgeReport, ModelRef, PreparedData, Published, ReferenceLogps,
                      TaskScores, TrainedAdapter)


@dataclass
class StageRow:
    stage: str
    status: str  # "ran" | "cached"
    seconds: float
    metric: str
    output: str
    key: str = ""


def key_metric(record) -> str:
    if isinstance(record, PreparedData):
        c = record.counts
        return f"train {c['train']}, held-out {c['heldout']}, rejected {c['rejected']}"
    if isinstance(record, TrainedAdapter):
        m = record.metrics
        retried = f", {len(record.retries)} collapse retries" if record.retries else ""
        if "kto/desirable" in m:  # TRL's KTO logs no reward accuracy
            return (f"kto on {m['kto/desirable']:.0f} desirable + {m['kto/undesirable']:.0f} undesirable, "
                    f"margin {m.get('rewards/margins', float('nan')):.3f}, kl {m.get('kl', float('nan')):.3f}{retried}")
        return (f"reward acc {m.get('rewards/accuracies', float('nan')):.2f}, "
                f"margin {m.get('rewards/margins', float('nan')):.3f}{retried}")
    if isinstance(record, TaskScores):
        return f"start model scored on {len(record.scores)} tasks"
    if isinstance(record, ReferenceLogps):
        return f"reference log-probs {record.digest[:12]}"
    if isinstance(record, EvalReport):
        m = record.metrics
        if "start_accuracy" not in m:  # unpaired held-out data: no pair to compare (EvalReport.notes says so)
            return (f"held-out pref. acc n/a (unpaired); kto reward acc "
                    f"{m.get('tuned_kto_reward_accuracy', float('nan')):.3f}, "
                    f"margin {m.get('tuned_kto_reward_margin', float('nan')):.3f}")
        return f"held-out pref. acc {m['start_accuracy']:.3f} -> {m['tuned_accuracy']:.3f}"
    if isinstance(record, Answers):
        return f"start model answered {record.count} prompts"
    if isinstance(record, JudgeReport):
        f = record.figures
        return (f"win rate {f['win_rate']:.2f}, length-controlled {f['lc_win_rate']:.2f} "
                f"(W/T/L {f['wins']}/{f['ties']}/{f['losses']})")
    if isinstance(record, Exports):
        made = [name for name in ("adapter", "merged") if getattr(record, name)]
        return ", ".join(made + [f"gguf {t}" for t in record.gguf])
    if isinstance(record, Published):
        return (f"{record.repo_id}@{record.revision} " +
                (f"commit {record.commit[:12]}" if record.new_commit else "unchanged, no new commit"))
    if isinstance(record, ModelRef):
        return f"{record.role} {record.digest[:12]}"
    return ""


def text_table(rows: list[StageRow]) -> str:
    header = ("stage", "status", "seconds", "key metric")
    cells = [header] + [(r.stage, r.status, f"{r.seconds:.1f}", r.metric) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(header))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(pipeline: str, rows: list[StageRow], notes: list[str]) -> str:
    out = [f"# dpoflow run: {pipeline}", "", "| stage | status | seconds | key metric |", "|---|---|---|---|"]
    out += [f"| {r.stage} | {r.status} | {r.seconds:.1f} | {r.metric} |" for r in rows]
    out += [""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def rows_as_dicts(rows: list[StageRow]) -> list[dict]:
    return [asdict(r) for r in rows]
