"""prepare: read preference data from every source, turn each row into normalized pairs (or, for unpaired
thumbs-up/down rows, one example each: dpoflow.engine.unpaired), clean them,
render them with the chat template (once, for SFT, DPO and evaluation alike), split train/held-out by
prompt hash and write both as Parquet (unpaired examples beside the pairs, in {train,heldout}_unpaired.parquet,
when there are any: the same rules, counts, split and decontamination apply to them).

Streaming in two passes, so memory stays flat in the size of the data apart from the dedup index:
1. read -> pairs -> checks -> dedup -> render -> token lengths -> split: candidates to scratch files;
2. held-out candidates -> mixing -> Parquet, and an n-gram index of them plus the forgetting-check
   tasks; train candidates -> mixing -> decontamination -> Parquet.
Every item read is either kept or set aside in `rejected.jsonl` with its rule, and counted; the stage
checks that the counts add up for every source.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dpoflow.engine import forgetting
from dpoflow.base.artifacts import fresh_dir, seal
from dpoflow.engine.cleaning import NgramIndex, eval_texts, length_problem, sample_rank, token_lengths, unit_hash
from dpoflow.base.config import DataSpec, SourceSpec
from dpoflow.engine.datareport import CLEANING_RULES, Tally, build_report, length_histograms, report_markdown
from dpoflow.engine.models import load_tokenizer
from dpoflow.base.layouts import grouped_by_prompt
from dpoflow.engine.examples import examples_of
from dpoflow.engine.pairs import DataError, Pair, Rejection, dedup_key
from dpoflow.base.records import DataSource, ModelRef, PreparedData
from dpoflow.base.redact import redact
from dpoflow.engine.sources import read_source
from dpoflow.engine.unpaired import Unpaired
from dpoflow.engine.unpaired import dedup_key as unpaired_key

from . import stage_task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BATCH = 1024
COLUMNS = ("prompt", "chosen", "rejected", "source")
UNPAIRED_COLUMNS = ("prompt", "completion", "label", "source")
ANSWERS = {"pair": ("chosen", "rejected"), "unpaired": ("completion",)}  # the answer fields of each kind


def _kind(item: Pair | Unpaired) -> str:
    return "unpaired" if isinstance(item, Unpaired) else "pair"


def is_heldout(prompt: str, fraction: float) -> bool:
    """Deterministic by prompt text, so one prompt never lands in both splits."""
    return unit_hash(prompt) < fraction


def _conversation(pair: Pair | Unpaired, system_prompt: str | None) -> list[dict]:
    messages = pair.messages
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def render(tokenizer, pair: Pair | Unpaired, system_prompt: str | None) -> dict:
    """The one place the chat template is applied; SFT, DPO and evaluation all read its output."""
    prompt = tokenizer.apply_chat_template(_conversation(pair, system_prompt), tokenize=False,
                                           add_generation_prompt=True)
    if isinstance(pair, Unpaired):
        return {"prompt": prompt, "completion": pair.completion + tokenizer.eos_token, "label": pair.label}
    return {
        "prompt": prompt,
        "chosen": pair.chosen + tokenizer.eos_token,
        "rejected": pair.rejected + tokenizer.eos_token,
    }


def round_trip_problem(tokenizer, pair: Pair | Unpaired, system_prompt: str | None,
                       rendered: dict) -> tuple[str, str, str] | None:
    """(reason, field, detail) when the template renders the whole conversation (prompt and chosen answer,
    or an unpaired example's completion) otherwise than the rendered prompt followed by the answer: a
    doubled BOS or system prompt, a turn rendered differently once answered. The model would be trained
    on a context it never sees."""
    answer = pair.completion if isinstance(pair, Unpaired) else pair.chosen
    whole = tokenizer.apply_chat_template([*_conversation(pair, system_prompt),
                                           {"role": "assistant", "content": answer}], tokenize=False)
    prompt = rendered["prompt"]
    if whole.startswith(prompt) and whole[len(prompt):].startswith(answer):
        return None
    at = next((n for n, (a, b) in enumerate(zip(whole, prompt + answer)) if a != b),
              min(len(whole), len(prompt) + len(answer)))
    return ("template_round_trip", "prompt", f"the template renders the whole conversation differently from "
                                             f"character {at}: {whole[max(0, at - 20):at + 20]!r} vs "
                                             f"{(prompt + answer)[max(0, at - 20):at + 20]!r}")


class _Rejects:
    """rejected.jsonl, written as rows are set aside; `on_error: fail` raises at the first bad row."""

    def __init__(self, path: Path, tally: Tally, fail: bool):
        self.file, self.tally, self.fail = open(path, "w", encoding="utf-8"), tally, fail

    def add(self, source: int, rejection: Rejection) -> None:
        if self.fail and rejection.reason not in CLEANING_RULES:
            raise DataError(rejection.message())
        record = {"source": rejection.source, "reason": rejection.reason, "field": rejection.field,
                  "detail": rejection.detail, "row": rejection.row}
        line = json.dumps(record, ensure_ascii=False, default=str)
        try:
            self.file.write(line + "\n")
        except UnicodeEncodeError:  # a lone surrogate: JSON's ASCII escapes write it back as it was read
            self.file.write(json.dumps(record, default=str) + "\n")
        self.tally.reject(source, record)


@dataclass
class _Passes:
    """What both passes share: the sources (numbered by their place in the list), the data settings,
    the scratch folder that holds the candidates between the passes, the counts per source and the
    file of items set aside."""

    sources: list[SourceSpec]
    spec: DataSpec
    scratch: Path
    tally: Tally
    rejects: _Rejects


def prepare_data(sources: list[SourceSpec | str], spec: DataSpec, model: ModelRef, out_dir: Path,
                 max_length: int | None = None, eval_tasks: tuple[str, ...] = ()) -> PreparedData:
    sources = [SourceSpec(path=s) if isinstance(s, str) else s for s in sources]
    tokenizer = load_tokenizer(model.path)
    fresh_dir(out_dir)
    scratch = out_dir.with_name(out_dir.name + "-candidates")
    fresh_dir(scratch)
    tally = Tally([s.label for s in sources])
    rejects = _Rejects(out_dir / "rejected.jsonl", tally, spec.on_error == "fail")
    passes = _Passes(sources, spec, scratch, tally, rejects)
    lengths: dict[str, list[int]] = {"prompt": [], "chosen": [], "rejected": []}
    extra: dict = {"warnings": []}
    try:
        try:
            ranks = _first_pass(passes, tokenizer, max_length=max_length if spec.drop_over_max_length else None)
            keep = _mixing(sources, ranks)
            lengths, extra = _second_pass(passes, out_dir, keep=keep, eval_tasks=eval_tasks)
        finally:
            rejects.file.close()
            shutil.rmtree(scratch, ignore_errors=True)
        tally.check()
        extra["warnings"] += _mix_warnings(sources, ranks)
        _require_data(sources, tally)
    finally:  # also when the data fails: the report of what was read is how to see why
        _write_report(out_dir, tally, lengths, {"max_length": max_length, **extra}, spec.format != "auto")
    counts = tally.totals()
    unpaired = {split: str(out_dir / f"{split}_unpaired.parquet") if (out_dir / f"{split}_unpaired.parquet").is_file()
                else "" for split in ("train", "heldout")}
    return PreparedData(path=str(out_dir), digest=seal(out_dir), counts=counts,
                        train=str(out_dir / "train.parquet"), heldout=str(out_dir / "heldout.parquet"),
                        rejected=str(out_dir / "rejected.jsonl"), report=str(out_dir / "data_report.json"),
                        train_unpaired=unpaired["train"], heldout_unpaired=unpaired["heldout"])


def _write_report(out_dir: Path, tally: Tally, lengths: dict, extra: dict, explicit_format: bool) -> None:
    # A record (copied to the run folder, shown as an artifact): its examples quote rows, secrets masked.
    report = redact(build_report(tally, lengths, extra, explicit_format))
    (out_dir / "data_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    (out_dir / "data_report.md").write_text(report_markdown(report))
    length_histograms(lengths, extra.get("max_length"), out_dir / "data_report.png")


def _first_pass(passes: _Passes, tokenizer: PreTrainedTokenizerBase,
                max_length: int | None) -> dict[int, list[float]]:
    """Candidates (rendered, checked, deduplicated, within max_length when given) to
    scratch/{train,heldout}.jsonl. Returns each source's candidates' sample ranks (for mixing by count)."""
    spec = passes.spec
    files = {split: open(passes.scratch / f"{split}.jsonl", "w", encoding="utf-8") for split in ("train", "heldout")}
    seen: dict[str, str] = {}  # dedup key -> where that pair was first read
    ranks: dict[int, list[float]] = {i: [] for i in range(len(passes.sources))}

    def flush(batch: list[tuple[int, str, Pair | Unpaired, dict, str]]) -> None:
        if not batch:
            return
        fields = ANSWERS[_kind(batch[0][2])]  # a batch holds one kind
        rendered = [render(tokenizer, pair, spec.system_prompt) for _, _, pair, _, _ in batch]
        for (i, where, pair, row, key), out, (lengths, seam) in zip(batch, rendered,
                                                                    token_lengths(tokenizer, rendered, fields)):
            problem = (round_trip_problem(tokenizer, pair, spec.system_prompt, out) or seam
                       or (length_problem(lengths, max_length, fields) if max_length else None))
            if problem:
                passes.rejects.add(i, Rejection(where, *problem, row))
                continue
            rank = sample_rank(key)
            ranks[i].append(rank)
            split = "heldout" if is_heldout(out["prompt"], spec.heldout_fraction) else "train"
            files[split].write(json.dumps({**out, "source": where, "i": i, "rank": rank, "lengths": lengths,
                                           "text": pair.prompt_text}, ensure_ascii=False) + "\n")
        batch.clear()

    try:
        for i, source in enumerate(passes.sources):
            batches: dict[str, list] = {"pair": [], "unpaired": []}
            for where, row, rejection in grouped_by_prompt(read_source(source), spec.format):
                if rejection is not None:
                    passes.tally.read[i] += 1
                    passes.rejects.add(i, rejection)
                    continue
                layout, items = examples_of(where, row, spec.format, spec.columns, spec.pairing, spec.min_margin,
                                            spec.prefer)
                passes.tally.layouts[i][layout] += 1
                for at, pair in items:
                    passes.tally.read[i] += 1
                    if isinstance(pair, Rejection):
                        pair.row = row
                        passes.rejects.add(i, pair)
                        continue
                    kind = _kind(pair)
                    key = unpaired_key(pair) if kind == "unpaired" else dedup_key(pair)
                    if key in seen:
                        # A duplicate is a cleaning outcome, not bad input: set aside in both modes.
                        what = "same prompt and completion as" if kind == "unpaired" else "same pair as"
                        passes.rejects.add(i, Rejection(at, "duplicate", None, f"{what} {seen[key]} (after "
                                                                                "normalization)", row))
                        continue
                    seen[key] = at
                    batch = batches[kind]
                    batch.append((i, at, pair, row, key))
                    if len(batch) >= BATCH:
                        flush(batch)
            for batch in batches.values():
                flush(batch)
    finally:
        for f in files.values():
            f.close()
    return ranks


def _mixing(sources: list[SourceSpec], ranks: dict[int, list[float]]) -> dict[int, float]:
    """Per source, the sample rank below which a candidate is used (1.0: all of them). A weight keeps
    that share; a count keeps the count lowest-ranked, so the choice is the same on every run."""
    keep = {}
    for i, source in enumerate(sources):
        if source.count is not None and source.count < len(ranks[i]):
            keep[i] = sorted(ranks[i])[source.count - 1]
        else:
            keep[i] = source.weight if source.weight is not None else 1.0
    return keep


def _mix_warnings(sources: list[SourceSpec], ranks: dict[int, list[float]]) -> list[str]:
    return [f"{s.label}: count {s.count} asked but only {len(ranks[i])} clean pairs; all used"
            for i, s in enumerate(sources) if s.count is not None and s.count > len(ranks[i])]


def _second_pass(passes: _Passes, out_dir: Path, keep: dict[int, float],
                 eval_tasks: tuple[str, ...]) -> tuple[dict[str, list[int]], dict]:
    """The candidates mixed in (`keep`: per source, the sample rank below which one is used) to
    heldout.parquet, then to train.parquet those that share no n-gram with a held-out prompt or an
    `eval_tasks` item. Returns the kept pairs' token lengths and the report's decontamination part."""
    lengths: dict[str, list[int]] = {"prompt": [], "chosen": [], "rejected": []}
    dc = passes.spec.decontamination
    index = NgramIndex(dc.ngram, dc.template_prompts) if dc.enabled else None
    checked, not_checked = ["held-out split"], []

    def used(c: dict) -> bool:
        if c["rank"] <= keep[c["i"]]:
            return True
        passes.rejects.add(c["i"], Rejection(c["source"], "sampled_out", None,
                                             f"not sampled: the source is mixed in by weight/count", _pair_row(c)))
        return False

    with _Split(out_dir, "heldout") as heldout:
        for c in _candidates(passes.scratch / "heldout.jsonl"):
            if used(c):
                heldout.add(c, passes.tally, lengths)
                if index is not None:
                    index.add(c["text"], f"held-out pair {c['source']}", is_prompt=True)
    if index is not None:
        task_files = {t: forgetting.EVALS_DIR / f"{t.removeprefix('dpoflow_')}.jsonl" for t in eval_tasks
                      if t != forgetting.PREFERENCE_TASK}
        checked += [t for t, p in task_files.items() if p.is_file()]
        not_checked = [t for t, p in task_files.items() if not p.is_file()]
        for text, item in eval_texts({t: p for t, p in task_files.items() if p.is_file()}):
            index.add(text, item)
    hits: dict[int, set[int]] = {}  # candidate number -> its indexed n-grams (few candidates have any)
    if index is not None:  # a first look over train, to count how many prompts share each n-gram
        for n, c in enumerate(_candidates(passes.scratch / "train.jsonl")):
            if c["rank"] <= keep[c["i"]]:
                found = index.count(c["text"])
                if found:
                    hits[n] = found
    with _Split(out_dir, "train") as train:
        for n, c in enumerate(_candidates(passes.scratch / "train.jsonl")):
            if not used(c):
                continue
            hit = index.contaminating(c["text"], hits[n]) if n in hits else None
            if hit:
                passes.rejects.add(c["i"], Rejection(c["source"], "contaminated", "prompt",
                                                     f"shares the {index.n}-gram \"{hit[0]}\" with {hit[1]}",
                                                     _pair_row(c)))
                continue
            train.add(c, passes.tally, lengths)
    warnings = [f"decontamination could not read {t} (not a dpoflow task; no offline data)" for t in not_checked]
    extra = {"decontamination": {"enabled": index is not None, "ngram": dc.ngram,
                                 "template_prompts": dc.template_prompts,
                                 "template_ngrams": sum(1 for v in index.df.values() if v > dc.template_prompts)
                                 if index is not None else 0,
                                 "checked_against": checked if index is not None else [],
                                 "eval_ngrams": len(index) if index is not None else 0},
             "warnings": warnings}
    return lengths, extra


def _pair_row(c: dict) -> dict:
    """A candidate as the rendered row it would have been kept as (a pair, or an unpaired example)."""
    return {k: c[k] for k in ("prompt", "chosen", "rejected", "completion", "label") if k in c}


def _candidates(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


class _ParquetRows:
    """A Parquet file of rows, written in batches; opened at the first row, or at the end when `always`."""

    def __init__(self, path: Path, columns: tuple[str, ...], always: bool):
        import pyarrow as pa

        self.path, self.columns, self.always, self.rows = path, columns, always, []
        self.schema = pa.schema([(c, pa.bool_() if c == "label" else pa.string()) for c in columns])
        self.writer = None

    def add(self, candidate: dict) -> None:
        self.rows.append({c: candidate[c] for c in self.columns})
        if len(self.rows) >= BATCH:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.writer is None and (self.rows or self.always):
            self.writer = pq.ParquetWriter(self.path, self.schema)
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self._flush()
        if self.writer is not None:
            self.writer.close()


class _Split:
    """A split's files: `<split>.parquet` of pairs (always written: later stages read it, empty or not), and
    `<split>_unpaired.parquet` of unpaired examples when there are any."""

    def __init__(self, out_dir: Path, split: str):
        self.split = split
        self.pairs = _ParquetRows(out_dir / f"{split}.parquet", COLUMNS, always=True)
        self.unpaired = _ParquetRows(out_dir / f"{split}_unpaired.parquet", UNPAIRED_COLUMNS, always=False)

    def __enter__(self):
        return self

    def add(self, candidate: dict, tally: Tally, lengths: dict[str, list[int]]) -> None:
        unpaired = "completion" in candidate
        (self.unpaired if unpaired else self.pairs).add(candidate)
        tally.kept[candidate["i"]][self.split] += 1
        if unpaired:
            tally.count_unpaired(candidate["i"], self.split, candidate["label"])
        for field, n in zip(("prompt", *ANSWERS["unpaired" if unpaired else "pair"]), candidate["lengths"]):
            lengths.setdefault(field, []).append(n)

    def __exit__(self, *exc):
        self.pairs.close()
        self.unpaired.close()


def _require_data(sources: list[SourceSpec], tally: Tally) -> None:
    names = ", ".join(s.label for s in sources)
    counts = tally.totals()
    if counts["read"] == 0:
        raise DataError(f"{names}: no rows (empty data)")
    for i in range(len(sources)):  # a source that gives nothing is a mistake, whatever the others give
        problem = tally.empty_source_problem(i)
        if problem:
            raise DataError(problem)
    for split in ("train", "heldout"):
        if not counts[split]:
            raise DataError(f"{names}: the {split} split is empty ({counts['read']} items read, "
                            f"{counts['rejected']} set aside); add data or change heldout_fraction")


def evaluation_items(inputs: dict) -> dict:
    """What decontamination depends on beyond the arguments: the items of the tasks it checks against."""
    return {"evals": forgetting.tasks_digest() if inputs.get("eval_tasks") else None}


@stage_task(depends_on=evaluation_items)
def prepare_task(out_dir: str, sources: list[DataSource], spec: DataSpec, model: ModelRef,
                 max_length: int | None = None, eval_tasks: tuple[str, ...] = ()) -> PreparedData:
    """`sources`: the data sources with their content fingerprints (their key); `spec.sources` is not read."""
    return prepare_data([s.spec for s in sources], spec, model, Path(out_dir), max_length, eval_tasks)
