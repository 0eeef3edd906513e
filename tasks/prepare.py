"""prepare: read preference pairs, validate every row, render them with the chat template, split
train/held-out by prompt hash. Bad rows are kept aside with file, line, field and reason."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dpoflow.artifacts import fresh_dir, seal, write_jsonl
from dpoflow.config import DataSpec
from dpoflow.models import load_tokenizer
from dpoflow.records import ModelRef, PreparedData

from . import stage_task

FIELDS = ("prompt", "chosen", "rejected")


class DataError(ValueError):
    """Input data that cannot be used; the message names file, line and field."""


@dataclass
class Rejection:
    source: str  # file:line
    reason: str  # rule name, counted in the report
    field: str | None
    detail: str

    def message(self) -> str:
        where = f"{self.source}: field {self.field!r}: " if self.field else f"{self.source}: "
        return where + self.detail


def read_jsonl(path: Path) -> Iterator[tuple[str, dict | None, Rejection | None]]:
    """(file:line, row, None) for each good JSON object, (file:line, None, rejection) for a bad line."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield where, None, Rejection(where, "not_utf8", None, f"bytes are not UTF-8 ({e.reason} at byte {e.start})")
                continue
            except json.JSONDecodeError as e:
                yield where, None, Rejection(where, "bad_json", None, f"not valid JSON ({e.msg}, column {e.colno})")
                continue
            if not isinstance(row, dict):
                yield where, None, Rejection(where, "bad_json", None, f"expected a JSON object, got {type(row).__name__}")
                continue
            yield where, row, None


@dataclass
class Pair:
    messages: list[dict]  # the prompt as a conversation, ending with a user turn
    chosen: str
    rejected: str


ROLES = {"system", "user", "assistant"}
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def to_pair(where: str, row: dict, fmt: str = "auto", columns: dict[str, str] | None = None) -> Pair | Rejection:
    """One input row in any supported format as a normalized Pair, or the reason it cannot be one."""
    for canonical, column in (columns or {}).items():
        if column in row:
            row = {**row, canonical: row[column]}
    if fmt == "auto":
        fmt = detect_format(row)
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
    if isinstance(row.get("chosen"), list) or isinstance(row.get("prompt"), list):
        return "conversational"
    if "prompt" not in row and isinstance(row.get("chosen"), str) and "\n\nAssistant:" in row["chosen"]:
        return "implicit"
    return "explicit"


def _conversational(where: str, row: dict) -> Pair | Rejection:
    for field in ("chosen", "rejected"):
        if field not in row:
            return Rejection(where, "missing_field", field, "missing")
        bad = _bad_messages(row[field])
        if bad:
            return Rejection(where, "bad_messages", field, bad)
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(row.get("prompt"), list):  # TRL style: prompt turns apart, one answer each
        bad = _bad_messages(row["prompt"])
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
    order = _role_order_problem(prompt)
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
    order = _role_order_problem(messages)
    if order:
        return Rejection(where, "roles_out_of_order", "chosen", order)
    return Pair(messages, row["chosen"][len(head):].strip(), row["rejected"][len(head):].strip())


def _bad_messages(messages) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "expected a non-empty list of {role, content} messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"message {i}: expected {{role: system|user|assistant, content: string}}"
    return None


def _role_order_problem(prompt: list[dict]) -> str | None:
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


def is_heldout(prompt: str, fraction: float) -> bool:
    """Deterministic by prompt text, so one prompt never lands in both splits."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big") / 2**64
    return bucket < fraction


def render(tokenizer, pair: Pair, system_prompt: str | None) -> dict:
    """The one place the chat template is applied; SFT, DPO and evaluation all read its output."""
    messages = pair.messages
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return {
        "prompt": prompt,
        "chosen": pair.chosen + tokenizer.eos_token,
        "rejected": pair.rejected + tokenizer.eos_token,
    }


def prepare_data(sources: list[str], spec: DataSpec, model: ModelRef, out_dir: Path) -> PreparedData:
    tokenizer = load_tokenizer(model.path)
    fresh_dir(out_dir)
    splits: dict[str, list[dict]] = {"train": [], "heldout": []}
    rejected: list[Rejection] = []
    counts: Counter[str] = Counter()
    seen: dict[str, str] = {}  # dedup key -> where it was first seen
    for source in sources:
        for where, row, rejection in read_jsonl(Path(source)):
            counts["read"] += 1
            pair = rejection or to_pair(where, row, spec.format, spec.columns)
            if isinstance(pair, Pair):
                key = dedup_key(pair)
                if key in seen:
                    pair = Rejection(where, "duplicate", None, f"same pair as {seen[key]} (after normalization)")
                else:
                    seen[key] = where
            if isinstance(pair, Rejection):
                # A duplicate is a cleaning outcome, not bad input: counted and kept aside in both modes.
                if spec.on_error == "fail" and pair.reason != "duplicate":
                    raise DataError(pair.message())
                rejected.append(pair)
                counts[f"rejected_{pair.reason}"] += 1
                continue
            rendered = render(tokenizer, pair, spec.system_prompt)
            split = "heldout" if is_heldout(rendered["prompt"], spec.heldout_fraction) else "train"
            splits[split].append({**rendered, "source": where})
    counts.update(train=len(splits["train"]), heldout=len(splits["heldout"]), rejected=len(rejected))
    if counts["read"] == 0:
        raise DataError(f"{', '.join(sources)}: no rows (empty data)")
    for split, rows in splits.items():
        if not rows:
            raise DataError(f"{', '.join(sources)}: the {split} split is empty "
                            f"({counts['read']} rows read, {len(rejected)} rejected); add data or change heldout_fraction")
    paths = {name: out_dir / f"{name}.jsonl" for name in ("train", "heldout", "rejected")}
    for split, rows in splits.items():
        write_jsonl(paths[split], rows)
    write_jsonl(paths["rejected"], [r.__dict__ for r in rejected])
    (out_dir / "report.json").write_text(json.dumps(dict(counts), indent=1, sort_keys=True))
    digest = seal(out_dir)
    return PreparedData(path=str(out_dir), digest=digest, counts=dict(counts),
                        **{name: str(p) for name, p in paths.items()})


@stage_task
def prepare_task(stage: str, key: str, out_dir: str, sources: list[str], spec: DataSpec,
                 model: ModelRef) -> PreparedData:
    return prepare_data(sources, spec, model, Path(out_dir))
