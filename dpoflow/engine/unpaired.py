"""Unpaired feedback rows -> normalized examples, or the reason a row cannot be one.

An unpaired row is what thumbs-up/down feedback gives: a `prompt`, one `completion` and a `label` saying
whether it was liked. `dpo.method: kto` trains on these; a preference pair is two of them (`unpair`: the
chosen answer desirable, the rejected one undesirable). The prompt is a string or a message list, the
completion a string or a list ending with one assistant message (TRL's conversational unpaired rows).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from dpoflow.engine.pairs import Rejection, bad_messages, normalize_text, role_order_problem

FIELDS = ("prompt", "completion", "label")
# What feedback tools write for a liked / disliked answer, compared case-insensitively. Numbers other than
# 1 and 0 (a 1-5 rating, say) are refused: where the cut lies between liked and disliked is the user's call.
DESIRABLE = {"true", "1", "yes", "y", "good", "desirable", "thumbs_up", "thumbsup", "thumbs-up", "up", "\U0001F44D"}
UNDESIRABLE = {"false", "0", "no", "n", "bad", "undesirable", "thumbs_down", "thumbsdown", "thumbs-down", "down",
               "\U0001F44E"}
LABEL_HELP = "expected true/false (also 1/0, yes/no, thumbs_up/thumbs_down, \U0001F44D/\U0001F44E)"
# Emoji variation selector and skin-tone modifiers: "👍🏽" is still a thumbs-up.
EMOJI_MODIFIERS = re.compile("[\uFE0F\U0001F3FB-\U0001F3FF]")


@dataclass
class Unpaired:
    messages: list[dict]  # the prompt as a conversation, ending with a user turn
    completion: str
    label: bool  # True: desirable (thumbs-up)

    @property
    def prompt_text(self) -> str:
        """The prompt's words without any template: what decontamination compares."""
        return "\n".join(m["content"] for m in self.messages)


def parse_label(value) -> bool | None:
    """The label as a bool, or None when it says neither liked nor disliked."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return {1: True, 0: False}.get(value)
    if isinstance(value, str):
        text = EMOJI_MODIFIERS.sub("", value).strip().casefold()
        if text in DESIRABLE:
            return True
        if text in UNDESIRABLE:
            return False
    return None


def looks_unpaired(row: dict) -> bool:
    """A row meant as unpaired feedback (it has a completion or a label and no chosen/rejected), so that a
    missing field is named as such rather than as a pair's missing `chosen`."""
    return bool({"completion", "label"} & row.keys()) and not {"chosen", "rejected"} & row.keys()


def to_example(where: str, row: dict) -> Unpaired | Rejection:
    """One unpaired row (canonical field names) as a normalized example."""
    for field in FIELDS:
        if field not in row:
            return Rejection(where, "missing_field", field, "missing: an unpaired row needs prompt, completion "
                                                            "and label")
    label = parse_label(row["label"])
    if label is None:
        return Rejection(where, "bad_label", "label", f"{LABEL_HELP}; got {json.dumps(row['label'], default=str)}")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and not bad_messages(prompt):
        order = role_order_problem(prompt)
        if order:
            return Rejection(where, "roles_out_of_order", "prompt", order)
        messages = prompt
    else:
        return Rejection(where, "wrong_type", "prompt", "expected a string or (system,) user, assistant, ..., user "
                                                        "messages")
    completion = _completion_text(row["completion"])
    if completion is None:
        return Rejection(where, "wrong_type", "completion", "expected a string or a list ending with one assistant "
                                                            "message")
    example = Unpaired([{**m, "content": normalize_text(m["content"])} for m in messages],
                       normalize_text(completion), label)
    # Checked after normalizing: normalizing can empty a field.
    for field, text in (("prompt", example.messages[-1]["content"]), ("completion", example.completion)):
        if not text.strip():
            return Rejection(where, "empty_field", field, "empty")
    return example


def _completion_text(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and not bad_messages(value) and value[-1]["role"] == "assistant":
        return value[-1]["content"]
    return None


def dedup_key(example: Unpaired) -> str:
    """Equal for examples of the same prompt and completion up to case and spacing, whatever their labels:
    the same answer liked once and disliked once is one answer with conflicting feedback."""
    text = json.dumps(["unpaired"] + [[m["role"], m["content"]] for m in example.messages] + [example.completion])
    return hashlib.sha256(re.sub(r"\s+", " ", text.casefold()).encode("utf-8")).hexdigest()


def unpair(pairs: list[dict]) -> list[dict]:
    """Rendered pairs {prompt, chosen, rejected} as unpaired rows {prompt, completion, label}: the chosen
    answer desirable, the rejected one undesirable."""
    return [row for p in pairs for row in ({"prompt": p["prompt"], "completion": p["chosen"], "label": True},
                                           {"prompt": p["prompt"], "completion": p["rejected"], "label": False})]
