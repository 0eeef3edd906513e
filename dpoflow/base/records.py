"""What stages hand each other: small JSON-able records of paths, content digests and metrics.

A record's `digest` is the content hash of what it stands for (a stage's sealed output folder, a data
source's files); a stage given a record is keyed by that digest, never by a path (dpoflow.base.cache), so a
changed file behind the same path re-runs what depends on it and a fresh clone finds the same keys.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from dpoflow.base.config import SourceSpec


class Record(BaseModel):
    digest: str


class Artifact(Record):
    path: str  # where the artifact is (a folder)


class DataSource(Record):
    """A data source as the prepare stage reads it; `digest` is its content (sources.fingerprint)."""

    spec: SourceSpec


class ModelRef(Artifact):
    """A loadable model folder (weights, tokenizer with chat template)."""

    source: str
    role: Literal["base", "sft"]


class PreparedData(Artifact):
    train: str  # the pairs (Parquet; empty when the data is all unpaired)
    heldout: str
    rejected: str
    counts: dict[str, int]
    report: str = ""  # data_report.json
    # Unpaired examples {prompt, completion, label} (Parquet), for dpo.method kto; "" when the data has none.
    train_unpaired: str = ""
    heldout_unpaired: str = ""

    @property
    def heldout_pairs(self) -> int:
        return self.counts.get("heldout", 0) - self.counts.get("heldout_unpaired", 0)


class ReferenceLogps(Artifact):
    """Reference log-probs of the train pairs under `start` (TRL's own computation), one row per pair."""

    file: str
    start: ModelRef
    # The same rows as TRL tokenized them for the pass, with their log-probs (Arrow): what the dpo stage
    # trains on, so no stage that reuses this pass tokenizes the data again. None in records made
    # before it existed; such a dpo stage tokenizes as usual.
    pairs: str | None = None


class TrainedAdapter(Artifact):
    """A LoRA adapter on top of `start`; the DPO reference is `start` with the adapter off."""

    start: ModelRef
    reference: str
    metrics: dict[str, float]
    retries: list[dict] = []


class TaskScores(Artifact):
    """lm-eval accuracy (points) per task of one model: the start model's are cached on their own."""

    scores: dict[str, float]


class EvalReport(Artifact):
    metrics: dict[str, float]
    notes: list[str] = []  # what could not be measured and why (no held-out pairs, say)
    base_scores: dict[str, float] = {}  # lm-eval accuracy points per task, the start model
    tuned_scores: dict[str, float] = {}


class Exports(Artifact):
    adapter: str | None
    merged: str | None
    checks: dict[str, float]
    gguf: dict[str, dict] = {}  # type -> {file, size_bytes, tensor_types, verification figures}


class Published(Artifact):
    """A Hub commit of a release (or the head it already was, when nothing changed)."""

    repo_id: str
    revision: str
    commit: str
    url: str
    new_commit: bool
    files: list[str]


class Answers(Artifact):
    """The start model's answers to the judged prompts (answers.jsonl): generated once per start model,
    data and generation settings, shared by every variant a sweep judges."""

    file: str
    count: int


class JudgeReport(Artifact):
    """Tuned vs start answers, judged pairwise: `figures` (judging.summarize), the judge's name, and the
    report files (judge.md, samples.md, pairs.jsonl) in the folder."""

    judge: str
    figures: dict
