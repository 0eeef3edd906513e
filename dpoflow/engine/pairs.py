"""Preference rows in every supported format -> normalized pairs, or the reason a row cannot be one.

Formats: explicit (prompt/chosen/rejected strings), conversational (message lists, UltraFeedback-
binarized whole conversations or TRL's prompt list + one answer each), implicit (two HH-RLHF
transcripts sharing everything before the last assistant turn) and scored (one prompt, several
completions with scores: best vs worst, or every pair at least `min_margin` apart). The public
datasets' layouts (dpoflow/base/layouts.py) are converted to one of these first.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import unicodedata
from dataclasses import dataclass

from dpoflow.base import layouts
from dpoflow.base.errors import Explained

FIELDS = ("prompt", "chosen", "rejected")


class DataError(ValueError, Explained):
    """Input data that cannot be used; the message names file, line and field."""


@dataclass
class Rejection:
    source: str  # file:line
    reason: str  # rule name, counted in the report
    field: str | None
    detail: str
    row: object = None  # the row as read (or the raw line), so a rejected row can be fixed and fed back

    def message(self) -> str:
        where = f"{self.source}: field {self.field!r}: " if self.field else f"{self.source}: "
        return where + self.detail


@dataclass
class Pair:
    messages: list[dict]  # the prompt as a conversation, ending with a user turn
    chosen: str
    rejected: str

    @property
    def prompt_text(self) -> str:
        """The prompt's words without any template: what decontamination compares."""
        return "\n".join(m["content"] for m in self.messages)


ROLES = {"system", "user", "assistant"}
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def to_pairs(where: str, row: dict, fmt: str = "auto", columns: dict[str, str] | None = None,
             pairing: str = "best_vs_worst", min_margin: float = 0.0,
             prefer: str = "better") -> list[tuple[str, Pair | Rejection]]:
    """The items one input row makes: (where, pair or rejection). One for most layouts; scored rows
    make one per chosen/rejected pair of completions (where `file:line#i>j`)."""
    return pairs_of(where, row, fmt, columns, pairing, min_margin, prefer)[1]


def pairs_of(where: str, row: dict, fmt: str = "auto", columns: dict[str, str] | None = None,
             pairing: str = "best_vs_worst", min_margin: float = 0.0,
             prefer: str = "better") -> tuple[str, list[tuple[str, Pair | Rejection]]]:
    """(the layout that read the row, to_pairs' items)."""
    row = mapped(row, columns)
    layout = layouts.BY_NAME[fmt] if fmt != "auto" else layouts.detect(row)
    if layout is None:
        if not set(FIELDS) & row.keys():
            return "unknown", [(where, _unknown(where, row))]
        layout = layouts.BY_NAME["explicit"]  # the closest: its rejection names the missing field
    missing = next((f for f in layout.fields if f not in row), None)
    if missing:
        return layout.name, [(where, Rejection(where, "missing_field", missing, "missing"))]
    try:
        converted = layout.convert(row, prefer)
    except layouts.Unusable as e:
        return layout.name, [(where, Rejection(where, e.reason, e.field, e.detail))]
    if layout.shape == "scored":
        return layout.name, [item for suffix, one in converted
                             for item in _scored(where + suffix, one, columns or {}, pairing, min_margin)]
    pair = to_pair(where, converted, layout.shape)
    margin = _margin(converted)
    if isinstance(pair, Pair) and min_margin > 0 and margin is not None and margin < min_margin:
        pair = Rejection(where, "below_min_margin", "score_chosen",
                         f"score gap {margin:g} is below min_margin {min_margin:g}")
    return layout.name, [(where, pair)]


def _unknown(where: str, row: dict) -> Rejection:
    return Rejection(where, "unknown_format", None,
                     f"no known format: expected a pair (prompt/chosen/rejected, chosen/rejected messages, HH-RLHF "
                     f"transcripts, prompt + scored completions or a public layout: README, 'Preparing data') or "
                     f"unpaired feedback (prompt/completion/label); "
                     f"got fields {', '.join(sorted(row)) or 'none'} (map yours with data.columns)")


def mapped(row: dict, columns: dict[str, str] | None) -> dict:
    for canonical, column in (columns or {}).items():
        if column in row and canonical not in COMPLETION_KEYS:
            row = {**row, canonical: row[column]}
    return row


def _margin(row: dict) -> float | None:
    scores = row.get("score_chosen"), row.get("score_rejected")
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores):
        return scores[0] - scores[1]
    return None


def to_pair(where: str, row: dict, fmt: str = "auto", columns: dict[str, str] | None = None) -> Pair | Rejection:
    """One input row of a one-pair format as a normalized Pair, or the reason it cannot be one."""
    row = mapped(row, columns)
    if fmt == "auto":
        fmt = detect_format(row)
    if fmt == "unknown":
        return _unknown(where, row)
    if fmt not in ("explicit", "conversational", "implicit"):  # a named layout: its rows are converted first
        [(_, pair)] = to_pairs(where, row, fmt)
        return pair
    if fmt == "scored":
        return Rejection(where, "wrong_format", "completions", "a scored row makes several pairs; use to_pairs")
    if fmt == "conversational":
        pair = _conversational(where, row)
    elif fmt == "implicit":
        pair = _implicit(where, row)
    else:
        pair = check_pair(where, row) or Pair([{"role": "user", "content": row["prompt"]}], row["chosen"],
                                              row["rejected"])
    # Checked after normalizing: normalizing can empty a field or make the two answers equal.
    return _checked(where, normalized(pair)) if isinstance(pair, Pair) else pair


def detect_format(row: dict) -> str:
    """The name of the layout that reads `row` ("unknown" when none does)."""
    layout = layouts.detect(row)
    if layout is None:
        return "explicit" if set(FIELDS) & row.keys() else "unknown"
    return layout.name


RESPONSE_KEYS = ("response", "text", "content", "completion")
SCORE_KEYS = ("score", "rating", "overall_score")
COMPLETION_KEYS = ("response", "score")  # data.columns entries that name fields inside a completion


def _scored(where: str, row: dict, columns: dict[str, str], pairing: str,
            min_margin: float) -> list[tuple[str, Pair | Rejection]]:
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and not bad_messages(prompt) and not role_order_problem(prompt):
        messages = prompt
    else:
        why = ("missing" if prompt is None else
               "expected a string or (system,) user, assistant, ..., user messages")
        return [(where, Rejection(where, "missing_field" if prompt is None else "wrong_type", "prompt", why))]
    completions = row.get("completions")
    if not isinstance(completions, list) or len(completions) < 2:
        return [(where, Rejection(where, "bad_completions", "completions",
                                  "expected a list of at least 2 {response, score} objects"))]
    scored: dict[int, tuple[float, str]] = {}  # completion number -> (score, text)
    unscored = None
    for i, c in enumerate(completions):
        text = _first(c, [columns["response"]] if "response" in columns else RESPONSE_KEYS)
        score = _first(c, [columns["score"]] if "score" in columns else SCORE_KEYS)
        if not isinstance(text, str):
            return [(where, Rejection(where, "bad_completions", "completions", f"completion {i}: no response text"))]
        if score is None:  # public sets leave some completions unrated (null): pair the rated ones
            unscored = i if unscored is None else unscored
            continue
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            return [(where, Rejection(where, "bad_completions", "completions", f"completion {i}: no numeric score"))]
        scored[i] = (float(score), text)
    if len(scored) < 2:
        return [(where, Rejection(where, "bad_completions", "completions", f"completion {unscored}: no numeric score"))]
    if pairing == "best_vs_worst":
        best = max(scored, key=lambda i: (scored[i][0], -i))
        worst = min(scored, key=lambda i: (scored[i][0], i))
        chosen_rejected = [(best, worst)]
    else:
        chosen_rejected = [(i, j) for i, j in itertools.permutations(scored, 2) if scored[i][0] > scored[j][0]]
    chosen_rejected = [(i, j) for i, j in chosen_rejected if scored[i][0] - scored[j][0] >= max(min_margin, 1e-12)]
    if not chosen_rejected:
        gap = max(s for s, _ in scored.values()) - min(s for s, _ in scored.values())
        return [(where, Rejection(where, "below_min_margin", "completions",
                                  f"no two completions are at least {max(min_margin, 0):g} apart in score "
                                  f"(largest gap {gap:g})"))]
    items = []
    for i, j in chosen_rejected:
        at = f"{where}#{i}>{j}"
        items.append((at, _checked(at, normalized(Pair(messages, scored[i][1], scored[j][1])))))
    return items


def _first(obj, keys):
    if not isinstance(obj, dict):
        return None
    return next((obj[k] for k in keys if k in obj), None)


def _conversational(where: str, row: dict) -> Pair | Rejection:
    for field in ("chosen", "rejected"):
        if field not in row:
            return Rejection(where, "missing_field", field, "missing")
        bad = bad_messages(row[field])
        if bad:
            return Rejection(where, "bad_messages", field, bad)
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(row.get("prompt"), list):  # TRL style: prompt turns apart, one answer each
        bad = bad_messages(row["prompt"])
        if bad:
            return Rejection(where, "bad_messages", "prompt", bad)
        prompt, chosen, rejected = row["prompt"], chosen[-1:], rejected[-1:]
    else:  # whole conversations (UltraFeedback binarized style) that differ in the last turn only
        prompt = chosen[:-1]
        if rejected[:-1] != prompt:
            return Rejection(where, "prompts_differ", "rejected", "the turns before the last differ from 'chosen'")
    for field, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or answer[-1]["role"] != "assistant":
            return Rejection(where, "no_assistant_turn", field, "does not end with an assistant turn")
    order = role_order_problem(prompt)
    if order:
        return Rejection(where, "roles_out_of_order", "chosen", order)
    return Pair(prompt, chosen[-1]["content"], rejected[-1]["content"])


def _implicit(where: str, row: dict) -> Pair | Rejection:
    for field in ("chosen", "rejected"):
        if not isinstance(row.get(field), str):
            return Rejection(where, "missing_field" if field not in row else "wrong_type", field,
                             "missing" if field not in row else "expected a transcript string")
    cut = row["chosen"].rfind("\n\nAssistant:")
    if cut < 0:
        return Rejection(where, "no_assistant_turn", "chosen", "no '\\n\\nAssistant:' turn")
    head = row["chosen"][:cut + len("\n\nAssistant:")]
    if not row["rejected"].startswith(head):
        return Rejection(where, "prompts_differ", "rejected", "does not share the conversation before the last "
                                                                "assistant turn with 'chosen'")
    parts = HH_TURN.split(row["chosen"][:cut])  # ["", "Human", text, "Assistant", text, ...]
    if parts[0].strip() or len(parts) < 3:
        return Rejection(where, "roles_out_of_order", "chosen", "must start with '\\n\\nHuman:'")
    messages = [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
                for who, text in zip(parts[1::2], parts[2::2])]
    order = role_order_problem(messages)
    if order:
        return Rejection(where, "roles_out_of_order", "chosen", order)
    return Pair(messages, row["chosen"][len(head):].strip(), row["rejected"][len(head):].strip())


def bad_messages(messages) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "expected a non-empty list of {role, content} messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"message {i}: expected {{role: system|user|assistant, content: string}}"
    return None


def role_order_problem(prompt: list[dict]) -> str | None:
    turns = prompt[1:] if prompt and prompt[0]["role"] == "system" else prompt
    expected = ["user", "assistant"] * len(turns)
    if not turns or [m["role"] for m in turns] != expected[:len(turns)] or turns[-1]["role"] != "user":
        return ("roles out of order: expected (system,) user, assistant, ..., user before the answer; got "
                + ", ".join(m["role"] for m in prompt))
    return None


def normalize_text(text: str) -> str:
    """Unicode NFC, runs of spaces/tabs as one space, no trailing spaces on a line, no blank edges.
    Newlines stay: they carry meaning in prompts (lists, code, a review after an instruction)."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [re.sub(r"[ \t\u00a0]+", " ", line).strip(" ") for line in text.split("\n")]
    return "\n".join(lines).strip("\n")


def normalized(pair: Pair) -> Pair:
    return Pair([{**m, "content": normalize_text(m["content"])} for m in pair.messages],
                normalize_text(pair.chosen), normalize_text(pair.rejected))


def dedup_key(pair: Pair) -> str:
    """Equal for pairs that differ only in case and spacing (after normalize_text)."""
    text = json.dumps([[m["role"], m["content"]] for m in pair.messages] + [pair.chosen, pair.rejected])
    return hashlib.sha256(re.sub(r"\s+", " ", text.casefold()).encode("utf-8")).hexdigest()


def _checked(where: str, pair: Pair) -> Pair | Rejection:
    for field, text in (("prompt", pair.messages[-1]["content"]), ("chosen", pair.chosen),
                        ("rejected", pair.rejected)):
        if not text.strip():
            return Rejection(where, "empty_field", field, "empty")
    if pair.chosen.strip() == pair.rejected.strip():
        return Rejection(where, "chosen_equals_rejected", "rejected", "identical to 'chosen'")
    return pair


def check_pair(where: str, row: dict) -> Rejection | None:
    for field in FIELDS:
        if field not in row:
            return Rejection(where, "missing_field", field, "missing")
        if not isinstance(row[field], str):
            return Rejection(where, "wrong_type", field, f"expected a string, got {type(row[field]).__name__}")
        if not row[field].strip():
            return Rejection(where, "empty_field", field, "empty")
    if row["chosen"].strip() == row["rejected"].strip():
        return Rejection(where, "chosen_equals_rejected", "rejected", "identical to 'chosen'")
    return None
