"""The prepare stage's report: what was read, kept and set aside (per source and per rule), token
lengths, and a few examples of each rejection; as JSON, markdown and a PNG of length histograms."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

EXAMPLES_PER_REASON = 3
# DPO learns "longer is better" when chosen answers are longer far more often than not: past this share of
# pairs the report warns (length bias is one of DPO's known failure modes).
LENGTH_BIAS_SHARE = 0.65
# Cleaning outcomes rather than bad input: `on_error: fail` sets these aside instead of stopping.
CLEANING_RULES = {"duplicate", "prompt_too_long", "pair_too_long", "contaminated", "sampled_out",
                  "below_min_margin", "tie", "template_round_trip", "template_seam"}


UNPAIRED_COUNTS = ("train_unpaired", "heldout_unpaired", "desirable", "undesirable")


class Tally:
    """Per-source counts of items read, kept and rejected by reason, and the first few examples of
    each rejection. `check()` is the invariant: every item read is kept or rejected, once."""

    def __init__(self, labels: list[str]):
        self.labels = labels
        self.read = Counter()
        self.kept: dict[int, Counter] = defaultdict(Counter)  # source -> split -> n
        self.rejected: dict[int, Counter] = defaultdict(Counter)  # source -> reason -> n
        self.examples: dict[str, list[dict]] = defaultdict(list)
        self.layouts: dict[int, Counter] = defaultdict(Counter)  # source -> layout that read its rows -> n
        self.first: dict[int, dict[str, dict]] = defaultdict(dict)  # source -> reason -> its first rejection
        # source -> train_unpaired / heldout_unpaired / desirable / undesirable -> n: the kept unpaired examples
        self.unpaired: dict[int, Counter] = defaultdict(Counter)

    def count_unpaired(self, source: int, split: str, label: bool) -> None:
        self.unpaired[source][f"{split}_unpaired"] += 1
        self.unpaired[source]["desirable" if label else "undesirable"] += 1

    def reject(self, source: int, rejection: dict) -> None:
        self.rejected[source][rejection["reason"]] += 1
        self.first[source].setdefault(rejection["reason"], rejection)
        shown = self.examples[rejection["reason"]]
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append({k: None if v is None else _short(v) for k, v in rejection.items()})

    def check(self) -> None:
        for i, label in enumerate(self.labels):
            kept, rejected = sum(self.kept[i].values()), sum(self.rejected[i].values())
            if kept + rejected != self.read[i]:
                raise RuntimeError(f"prepare: {label}: {self.read[i]} items read but {kept} kept + {rejected} "
                                   "rejected; a row was lost (a bug in dpoflow, please report it)")

    def layout(self, source: int, explicit: bool) -> str:
        """The layouts that read a source's rows, as the report shows them: `shp (auto)`, or
        `explicit 30, implicit 12 (auto)` for a mixed file."""
        seen = self.layouts[source].most_common()
        if not seen:
            return "-"
        names = seen[0][0] if len(seen) == 1 else ", ".join(f"{name} {n}" for name, n in seen)
        return names if explicit else f"{names} (auto)"

    def empty_source_problem(self, source: int) -> str | None:
        """For a source that kept nothing: its dominant reason, an example and, when obvious, the
        `data.columns` entry that would fix it; one line."""
        from dpoflow.base.layouts import column_hint

        if sum(self.kept[source].values()) or not self.read[source]:
            return None
        reason, n = self.rejected[source].most_common(1)[0]
        first = self.first[source][reason]
        row = first.get("row")
        fields = (f"that row has fields {', '.join(sorted(row))}" if isinstance(row, dict)
                  else "it could not be read as a row")
        at = f"field {first['field']!r}: " if first.get("field") else ""
        line = (f"{self.labels[source]}: nothing kept: {n} of {self.read[source]} items set aside as {reason} "
                f"(first at {first['source']}: {at}{first['detail']}; {fields})")
        fields = [first.get("field")] if reason == "missing_field" else ["prompt", "chosen", "rejected"]
        hints = [h for h in (column_hint(f, row) for f in fields) if h] if reason in ("missing_field",
                                                                                       "unknown_format") else []
        return "; ".join([line, *hints])

    def totals(self) -> dict[str, int]:
        """The flat counts the stage's record carries."""
        reasons = sum(self.rejected.values(), Counter())
        kept = sum(self.kept.values(), Counter())
        # `train` and `heldout` count every kept item; of those, the unpaired examples (only when there are any).
        unpaired = sum(self.unpaired.values(), Counter())
        return {"read": sum(self.read.values()), "train": kept["train"], "heldout": kept["heldout"],
                **{k: unpaired[k] for k in UNPAIRED_COUNTS if unpaired},
                "rejected": sum(reasons.values()), **{f"rejected_{r}": n for r, n in sorted(reasons.items())}}


def _short(value, limit: int = 300):
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates as \udXXX escapes
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def length_bias(lengths: dict[str, list[int]]) -> dict:
    """Median chosen/rejected token-length ratio over the kept pairs and the share where chosen is longer."""
    pairs = list(zip(lengths["chosen"], lengths["rejected"]))
    if not pairs:
        return {}
    ratios = sorted(c / max(r, 1) for c, r in pairs)
    mid = len(ratios) // 2
    median = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
    return {"median_ratio": round(median, 3), "chosen_longer": round(sum(c > r for c, r in pairs) / len(pairs), 3),
            "warn_above": LENGTH_BIAS_SHARE}


def build_report(tally: Tally, lengths: dict[str, list[int]], extra: dict, explicit_format: bool = False) -> dict:
    bias = length_bias(lengths)
    if bias and bias["chosen_longer"] > LENGTH_BIAS_SHARE:
        extra = {**extra, "warnings": [*extra.get("warnings", []),
                                       f"length bias: chosen is longer than rejected in {bias['chosen_longer']:.0%} of "
                                       f"pairs (median ratio {bias['median_ratio']:g}); DPO may learn to prefer "
                                       "length"]}
    return {
        "counts": tally.totals(),
        "sources": {label: {"read": tally.read[i], "kept": dict(tally.kept[i]), "rejected": dict(tally.rejected[i]),
                            "format": tally.layout(i, explicit_format), "formats": dict(tally.layouts[i]),
                            **({"unpaired": dict(tally.unpaired[i])} if tally.unpaired[i] else {})}
                    for i, label in enumerate(tally.labels)},
        "token_lengths": {field: _stats(values) for field, values in lengths.items()},
        "length_bias": bias,
        "examples": dict(tally.examples),
        **extra,
    }


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"min": ordered[0], "median": pick(0.5), "p95": pick(0.95), "max": ordered[-1],
            "mean": round(sum(ordered) / len(ordered), 1)}


def report_markdown(report: dict) -> str:
    c = report["counts"]
    lines = [f"## Data: {c['read']} items read, {c['train']} train + {c['heldout']} held-out kept, "
             f"{c['rejected']} set aside", "",
             *_unpaired_lines(c),
             "| source | read | kept | set aside | format |", "|---|---|---|---|---|"]
    for label, s in report["sources"].items():
        aside = ", ".join(f"{r} {n}" for r, n in sorted(s["rejected"].items())) or "-"
        lines.append(f"| {label} | {s['read']} | {sum(s['kept'].values())} | {aside} | {s.get('format', '-')} |")
    lines += ["", "| tokens | min | median | p95 | max |", "|---|---|---|---|---|"]
    for field, st in report["token_lengths"].items():
        if st:
            lines.append(f"| {field} | {st['min']} | {st['median']} | {st['p95']} | {st['max']} |")
    bias = report.get("length_bias")
    if bias:
        lines.append(f"\nchosen/rejected tokens: median ratio {bias['median_ratio']:g}, chosen longer in "
                     f"{bias['chosen_longer']:.0%} of pairs")
    for warning in report.get("warnings", []):
        lines.append(f"\n**warning:** {warning}")
    for reason, examples in report["examples"].items():
        lines += ["", f"### {reason}"]
        lines += [f"- `{e['source']}`: {e['detail']}" for e in examples]
    return "\n".join(lines) + "\n"


def _unpaired_lines(counts: dict) -> list[str]:
    """The kept unpaired examples by label, under the report's heading (none for pairs only)."""
    if "desirable" not in counts:
        return []
    pairs = counts["train"] + counts["heldout"] - counts["train_unpaired"] - counts["heldout_unpaired"]
    return [f"Unpaired examples (for dpo.method kto): {counts['desirable']} desirable, {counts['undesirable']} "
            f"undesirable ({counts['train_unpaired']} train + {counts['heldout_unpaired']} held-out); pairs: "
            f"{pairs} (with kto each gives one desirable and one undesirable example).", ""]


def length_histograms(lengths: dict[str, list[int]], max_length: int | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(lengths), figsize=(4 * len(lengths), 3), constrained_layout=True)
    for ax, (field, values) in zip(axes, lengths.items()):
        ax.hist(values, bins=40, color="#4878a8")
        if max_length:
            ax.axvline(max_length, color="#c44e52", linestyle="--", label=f"max_length {max_length}")
            ax.legend(fontsize=7)
        ax.set_title(f"{field} tokens (kept pairs)", fontsize=9)
        ax.set_xlabel("tokens", fontsize=8)
    fig.savefig(out, dpi=80)
    plt.close(fig)
