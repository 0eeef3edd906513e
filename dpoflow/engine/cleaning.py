"""Cleaning rules that need more than one row: token lengths with the pipeline's own tokenizer,
deterministic sampling for source mixing, and decontamination against evaluation items."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

WORD = re.compile(r"\w+")


def token_lengths(tokenizer, rows: list[dict], fields: tuple[str, ...] = ("chosen", "rejected")
                  ) -> list[tuple[tuple[int, ...], tuple[str, str, str] | None]]:
    """Per rendered row: (prompt, *fields) token counts (a pair's chosen and rejected, an unpaired row's
    completion), the answers counted in context as the trainer tokenizes them (prompt + answer); and the
    seam problem when the prompt's own tokens are not the start of prompt + answer (tokens merging across
    the boundary: TRL then cuts the prompt where the two diverge, and the model trains on a context it
    never sees). One batched call per text: the fast tokenizer runs a batch in Rust, and one call per row
    would dominate the stage."""
    def ids(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    prompts = ids([r["prompt"] for r in rows])
    joined = {f: ids([r["prompt"] + r[f] for r in rows]) for f in fields}
    out = []
    for n, p in enumerate(prompts):
        problem = None
        for field in fields:
            if joined[field][n][:len(p)] != p:
                problem = ("template_seam", field, f"the prompt's last tokens merge with the start of {field}: "
                                                   f"{tokenizer.decode(p[-3:])!r} + {rows[n][field][:12]!r}")
                break
        out.append(((len(p), *(len(joined[f][n]) - len(p) for f in fields)), problem))
    return out


def length_problem(lengths: tuple[int, ...], max_length: int,
                   fields: tuple[str, ...] = ("chosen", "rejected")) -> tuple[str, str, str] | None:
    """(reason, field, detail) when a pair (or an unpaired example) would be truncated by a trainer with this
    max_length; `lengths` as token_lengths gives them for `fields`."""
    prompt, answers = lengths[0], dict(zip(fields, lengths[1:]))
    if prompt >= max_length:
        return "prompt_too_long", "prompt", f"prompt is {prompt} tokens; max_length is {max_length}"
    field = max(fields, key=lambda f: answers[f])  # the first of equals: chosen before rejected
    longest = answers[field]
    if prompt + longest > max_length:
        return ("pair_too_long", field,
                f"prompt {prompt} + {field} {longest} = {prompt + longest} tokens; max_length is {max_length}")
    return None


def unit_hash(text: str) -> float:
    """`text`'s place in [0, 1), from its sha256: the same text lands at the same place on every run."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def sample_rank(key: str) -> float:
    """A pair's place in [0, 1) for sampling: from its content, so the same data samples the same way."""
    return unit_hash("sample:" + key)


class NgramIndex:
    """Word n-grams of evaluation texts (held-out prompts, forgetting-check items). A training prompt
    that shares one with them is contaminated: the model would be scored on what it was trained on.
    Words are lowercased `\\w+` runs, so case, punctuation and spacing don't hide a copy.

    An n-gram that many prompts share is template text (an instruction or system prompt repeated in
    every row), not a copied item: `df` counts the prompts, held-out and train, that hold each indexed
    n-gram, and `contaminating` ignores those above the limit."""

    def __init__(self, n: int, max_prompts: int):
        self.n, self.max_prompts = n, max_prompts
        self.items: dict[int, str] = {}  # hash of the n-gram -> the first evaluation item it came from
        self.df: dict[int, int] = {}  # hash -> prompts (held-out and train) that contain it

    def grams(self, text: str) -> dict[int, str]:
        words = WORD.findall(text.lower())
        return {hash(g): g for g in (" ".join(words[i:i + self.n]) for i in range(len(words) - self.n + 1))}

    def add(self, text: str, item: str, is_prompt: bool = False) -> None:
        for h in self.grams(text):
            self.items.setdefault(h, item)
            if is_prompt:
                self.df[h] = self.df.get(h, 0) + 1

    def count(self, text: str) -> set[int]:
        """Count a training prompt's indexed n-grams towards their `df`; returns them."""
        hits = {h for h in self.grams(text) if h in self.items}
        for h in hits:
            self.df[h] = self.df.get(h, 0) + 1
        return hits

    def contaminating(self, text: str, hits: set[int]) -> tuple[str, str] | None:
        """(the shared n-gram, the evaluation item it is in) for the first hit that is not template
        text, or None."""
        real = [h for h in hits if self.df.get(h, 0) <= self.max_prompts]
        if not real:
            return None
        grams = self.grams(text)
        h = min(real, key=lambda x: grams[x])  # the same n-gram reported on every run
        return grams[h], self.items[h]

    def __len__(self) -> int:
        return len(self.items)


def eval_texts(task_files: dict[str, Path]) -> Iterable[tuple[str, str]]:
    """(text, "task #row") of every item of the given lm-eval task data files (JSONL): all its string
    fields and choices, joined."""
    for task, path in task_files.items():
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                item = json.loads(line)
                parts = [v for v in item.values() if isinstance(v, str)]
                parts += [c for c in item.get("choices", []) if isinstance(c, str)]
                yield "\n".join(parts), f"{task} #{i}"
