"""prepare: read preference pairs, validate every row, render them with the chat template, split
train/held-out by prompt hash. Bad rows are kept aside with file, line, field and reason."""

from __future__ import annotations

import hashlib
import json
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


def render(tokenizer, row: dict, system_prompt: str | None) -> dict:
    """The one place the chat template is applied; SFT, DPO and evaluation all read its output."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    messages.append({"role": "user", "content": row["prompt"]})
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return {
        "prompt": prompt,
        "chosen": row["chosen"] + tokenizer.eos_token,
        "rejected": row["rejected"] + tokenizer.eos_token,
    }


def prepare_data(sources: list[str], spec: DataSpec, model: ModelRef, out_dir: Path) -> PreparedData:
    tokenizer = load_tokenizer(model.path)
    fresh_dir(out_dir)
    splits: dict[str, list[dict]] = {"train": [], "heldout": []}
    rejected: list[Rejection] = []
    counts: Counter[str] = Counter()
    for source in sources:
        for where, row, rejection in read_jsonl(Path(source)):
            counts["read"] += 1
            rejection = rejection or check_pair(where, row)
            if rejection:
                if spec.on_error == "fail":
                    raise DataError(rejection.message())
                rejected.append(rejection)
                counts[f"rejected_{rejection.reason}"] += 1
                continue
            split = "heldout" if is_heldout(row["prompt"], spec.heldout_fraction) else "train"
            splits[split].append({**render(tokenizer, row, spec.system_prompt), "source": where})
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
