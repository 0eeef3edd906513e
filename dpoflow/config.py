"""The one config schema: `pipelines.yaml`, the CLI's --set and the Prefect parameter form all go
through `PipelineConfig`. Defaults live here and nowhere else.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Strict):
    source: str = Field(
        "builtin:tiny-llama",
        description="`builtin:NAME` (built in code, offline), a local folder, or a Hugging Face Hub id.",
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit (Hub ids only).")


class SourceSpec(Strict):
    path: str | None = Field(None, description="A local file or glob: .jsonl/.ndjson, .json (a list of rows), "
                                               ".parquet or .csv. Relative paths resolve against pipelines.yaml.")
    hub: str | None = Field(None, description="A Hugging Face Hub dataset id (or a local dataset folder, as "
                                              "written by `datasets`), read with `split` and `revision`.")
    split: str = "train"
    subset: str | None = Field(None, description="The Hub dataset's configuration name, if it has several.")
    revision: str | None = Field(None, description="Hub branch, tag or commit of the dataset.")
    weight: float | None = Field(None, gt=0, le=1, description="Use this share of the source's clean pairs "
                                                               "(sampled by pair hash, deterministic).")
    count: int | None = Field(None, ge=1, description="Use exactly this many of the source's clean pairs "
                                                      "(all, with a warning, if it has fewer).")

    @model_validator(mode="after")
    def _one_location_one_mix(self):
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of path or hub")
        if self.weight is not None and self.count is not None:
            raise ValueError("give weight or count, not both")
        return self

    @property
    def label(self) -> str:
        return self.path or f"hub:{self.hub}[{self.split}]"


class DecontaminationSpec(Strict):
    enabled: bool = True
    ngram: int = Field(13, ge=3, description="Words in the n-grams a train prompt may not share with an "
                                             "evaluation item (the held-out split and the forgetting-check tasks).")
    template_prompts: int = Field(
        20, ge=1, description="An n-gram found in more prompts than this (train and held-out together) is template "
                              "text, such as an instruction every row repeats, and does not count as contamination.")


class DataSpec(Strict):
    sources: list[str | SourceSpec] = Field(
        ..., min_length=1,
        description="Where the pairs come from: a path or glob (string), or {path|hub, split, revision, weight|count}.",
    )
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="Share of prompts held out (split by prompt hash).")
    format: Literal["auto", "explicit", "conversational", "implicit", "scored"] = Field(
        "auto", description="explicit: prompt/chosen/rejected strings; conversational: chosen/rejected message "
                            "lists (an optional prompt list); implicit: two full HH-RLHF style transcripts "
                            "('\\n\\nHuman: ... \\n\\nAssistant: ...'); scored: a prompt with several scored "
                            "completions (UltraFeedback style); auto: detected per row.")
    columns: dict[str, str] = Field(
        {}, description="Your column names, e.g. {prompt: question, chosen: good}; for scored rows also "
                        "completions, response and score.")
    system_prompt: str | None = Field(None, description="System message put before every prompt that has none.")
    pairing: Literal["best_vs_worst", "all"] = Field(
        "best_vs_worst", description="Scored rows: the best against the worst completion, or every pair whose "
                                     "score gap is at least min_margin.")
    min_margin: float = Field(0.0, ge=0, description="Least score gap between chosen and rejected (scored rows, and "
                                                     "explicit rows with score_chosen/score_rejected).")
    drop_over_max_length: bool = Field(
        True, description="Drop pairs whose prompt + longer answer exceed dpo.max_length tokens (the pipeline's "
                          "tokenizer) rather than let the trainer truncate them.")
    decontamination: DecontaminationSpec = DecontaminationSpec()
    on_error: Literal["quarantine", "fail"] = Field(
        "quarantine", description="quarantine: keep bad rows aside in rejected.jsonl; fail: stop at the first."
    )

    @property
    def source_specs(self) -> list[SourceSpec]:
        return [SourceSpec(path=s) if isinstance(s, str) else s for s in self.sources]


class LoraSpec(Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class TrainSpec(Strict):
    learning_rate: float = Field(gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: run all epochs).")
    per_device_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(8, ge=1)
    max_length: int = Field(512, ge=8, description="Tokens of prompt + completion kept per sequence.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    gradient_checkpointing: bool | None = Field(None, description="None: on with a GPU, off on CPU.")
    logging_steps: int = Field(10, ge=1)
    lora: LoraSpec = LoraSpec()


class SFTSpec(TrainSpec):
    enabled: bool = False
    learning_rate: float = Field(2e-4, gt=0)


class GuardSpec(Strict):
    checkpoint_steps: int = Field(50, ge=1, description="Save a resumable checkpoint every N optimizer steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept while the stage runs (the newest ones; "
                                                       "a damaged newest one falls back to the one before).")
    max_chosen_logp_drop_per_token: float = Field(
        2.0, gt=0,
        description="Collapse: the chosen responses' log-prob stays this many nats per token below its first "
                    "logged value for `collapse_patience` logs in a row.")
    collapse_patience: int = Field(3, ge=1, description="Consecutive log lines past the limit that make a collapse "
                                                        "(a short dip that recovers is normal DPO).")
    max_retries: int = Field(2, ge=0, description="Retries after a collapse, each from the last good "
                                                  "checkpoint with the learning rate halved.")


LossName = Literal["sigmoid", "ipo", "robust", "hinge", "sft"]


class DPOSpec(TrainSpec):
    learning_rate: float = Field(5e-6, gt=0)
    beta: float = Field(0.1, gt=0)
    loss_type: list[LossName] = Field(["sigmoid"], min_length=1,
                                      description="TRL loss terms, e.g. [sigmoid, sft] with loss_weights [1.0, 0.2].")
    loss_weights: list[float] | None = None
    precompute_ref_log_probs: bool = Field(
        False, description="Compute the reference log-probs once as a cached artifact, reused by runs that "
                           "differ only in beta, lr or loss.")
    share_prompt: bool = Field(
        True, description="Run each pair's prompt once, with chosen and rejected both attending to it, instead of "
                          "once per answer: the same log-probs from fewer tokens (dpoflow/prompt_sharing.py).")
    guards: GuardSpec = GuardSpec()

    @model_validator(mode="after")
    def _weights_match_losses(self):
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} entries for "
                             f"{len(self.loss_type)} loss_type entries")
        return self


class DistributedSpec(Strict):
    num_processes: int = Field(1, ge=1, description="Training processes, one per GPU (1: no launcher). On a "
                                                    "CPU-only machine they run on gloo, which is for testing.")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every GPU holds the whole model (LoRA gradients all-reduced); fsdp: the "
                           "weights are sharded across GPUs, for models that outgrow one.")


class TrainSetup(Strict):
    backend: Literal["auto", "unsloth", "trl"] = Field(
        "auto", description="auto: Unsloth when a CUDA GPU and the gpu extra are present, else TRL + PEFT."
    )
    precision: Literal["auto", "bf16", "fp16", "fp8"] = Field(
        "auto", description="auto: bf16 where the GPU has it, else fp16 (with a warning); fp32 on CPU. fp8 needs "
                            "compute capability >= 8.9 and the unsloth backend.")
    quantize: Literal["auto", "none", "4bit"] = Field(
        "auto", description="auto: 4-bit base weights (QLoRA, unsloth backend) only when 16-bit ones would not "
                            "fit in free GPU memory.")
    grow_batch: bool = Field(
        True, description="On a GPU, raise the per-device batch (up to 8, with fewer accumulation steps, so the "
                          "effective batch is unchanged) while the memory estimate fits: larger micro-batches "
                          "train faster.")
    distributed: DistributedSpec = Field(
        DistributedSpec(), description="Data-parallel SFT and DPO through torchrun (TRL backend); the "
                                       "effective batch stays per_device_batch_size x gradient_accumulation_steps, "
                                       "split across the processes.")


class GateSpec(Strict):
    mode: Literal["enforce", "warn"] = Field(
        "enforce", description="enforce: a failed check stops the run before export (exit code 1); warn: report only.")
    max_drop: float = Field(2.0, ge=0, description="Largest allowed drop per task, in accuracy points.")
    per_task_max_drop: dict[str, float] = Field({}, description="Task name -> its own allowed drop.")
    required_gain: dict[str, float] = Field(
        {}, description="Task name -> least gain the tuned model must show, e.g. {dpoflow_preference: 5}.")


class EvaluateSpec(Strict):
    enabled: bool = True
    batch_size: int = Field(16, ge=1)
    tasks: list[str] = Field(
        ["dpoflow_knowledge", "dpoflow_arithmetic", "dpoflow_reading", "dpoflow_instructions", "dpoflow_preference"],
        description="lm-evaluation-harness tasks of the forgetting check. The dpoflow_* tasks ship with dpoflow "
                    "(dpoflow_preference: the held-out pairs); registry tasks (hellaswag, arc_easy, ...) need "
                    "the network.")
    limit: int | None = Field(None, ge=1, description="Items per task (None: all).")
    gate: GateSpec = GateSpec()


GGUFType = Literal["f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]


class ExportSpec(Strict):
    formats: list[Literal["adapter", "merged", "gguf"]] = Field(
        ["adapter", "merged"], description="gguf needs the gguf extra: pip install 'dpoflow[gguf]'.")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="dtype of the merged weights.")
    gguf_types: list[GGUFType] = Field(
        ["q8_0", "q4_k_m"], min_length=1,
        description="GGUF files to write; each is loaded in llama.cpp and checked against the merged model.")
    gguf_pre_tokenizer: str | None = Field(
        None, description="llama.cpp pre-tokenizer name (e.g. gpt-2) for a tokenizer llama.cpp's converter does "
                          "not recognize; the export's tokenization check proves it right or fails.")


class PublishSpec(Strict):
    enabled: bool = False
    repo_id: str | None = Field(None, description="Hub model repo, e.g. my-org/my-model-dpo (created if missing).")
    private: bool = Field(True, description="Create the repo private.")
    revision: str = Field("main", description="Branch to commit to (created from main if missing).")
    include: list[Literal["adapter", "merged", "gguf"]] = Field(
        ["adapter", "merged", "gguf"], description="Which exports to upload (those that were made).")
    token_secret: str | None = Field(
        None, description="Name of a Prefect Secret block holding the Hub token; default: the HF_TOKEN variable.")
    endpoint: str | None = Field(None, description="Hub URL (default: HF_ENDPOINT or https://huggingface.co).")
    max_attempts: int = Field(5, ge=1, description="Tries on 5xx answers and dropped connections, with backoff.")

    @model_validator(mode="after")
    def _repo_when_enabled(self):
        if self.enabled and not self.repo_id:
            raise ValueError("publish.enabled needs publish.repo_id")
        return self


class ScheduleSpec(Strict):
    cron: str | None = Field(None, description="Cron expression, e.g. '0 3 * * 1' (Mondays 03:00).")
    interval_seconds: int | None = Field(None, ge=60, description="Run every N seconds instead of a cron.")
    timezone: str = "UTC"
    active: bool = True

    @model_validator(mode="after")
    def _cron_or_interval(self):
        if (self.cron is None) == (self.interval_seconds is None):
            raise ValueError("give exactly one of cron or interval_seconds")
        return self


class DeploySpec(Strict):
    enabled: bool = Field(False, description="Make this pipeline a Prefect deployment (dpoflow sync / serve).")
    schedules: list[ScheduleSpec] = []
    paused: bool = Field(False, description="Keep the deployment's schedules from creating runs.")
    work_pool: str | None = Field(None, description="Work pool whose workers run it (None: only `dpoflow serve`).")
    work_queue: str | None = None
    job_variables: dict[str, Any] = Field({}, description="Work pool job variables, e.g. {image: ..., "
                                                          "env: {...}} or GPU requests for Kubernetes.")
    tags: list[str] = []
    repository: str | None = Field(
        None, description="Git URL the worker clones the code from, at the commit `dpoflow sync` ran on; "
                          "None: the worker runs the code where `dpoflow sync` ran (one machine).")


class PipelineConfig(Strict):
    name: str
    description: str = ""
    workdir: str = Field(".dpoflow", description="Cache, stage outputs and run folders; relative to pipelines.yaml.")
    seed: int = 42
    cpu_threads: int | None = Field(None, ge=1, description="torch threads on CPU (None: torch's default).")
    model: ModelSpec = ModelSpec()
    train: TrainSetup = TrainSetup()
    data: DataSpec
    sft: SFTSpec = SFTSpec()
    dpo: DPOSpec = DPOSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    export: ExportSpec = ExportSpec()
    publish: PublishSpec = PublishSpec()
    deploy: DeploySpec = DeploySpec()

    @model_validator(mode="after")
    def _publish_only_checked_models(self):
        if self.publish.enabled and not self.evaluate.enabled:
            raise ValueError("publish.enabled needs evaluate.enabled: only a model that passed the forgetting "
                             "check is pushed")
        return self

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\ "):
            raise ValueError("a pipeline name has no spaces or slashes")
        return v


class ConfigError(Exception):
    """A config that cannot be used; `problems` holds one line per bad field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


DEFAULT_FILE = "pipelines.yaml"
TOP_LEVEL_KEYS = {"defaults", "pipelines"}


def load_pipeline(name: str, file: str | Path = DEFAULT_FILE, overrides: list[str] = ()) -> PipelineConfig:
    """The named pipeline from `file`: defaults, then its own entry, then --set overrides."""
    doc, lines, path = _read(file)
    pipelines = doc.get("pipelines") or {}
    if name not in pipelines:
        known = ", ".join(sorted(pipelines)) or "none"
        raise ConfigError([f"{path}: no pipeline named {name!r} (defined: {known})"])
    return _build(name, doc, lines, path, overrides)


def validate_file(file: str | Path = DEFAULT_FILE, overrides: list[str] = ()) -> list[PipelineConfig]:
    """Every pipeline in `file`, or a ConfigError listing every problem in all of them."""
    doc, lines, path = _read(file)
    configs, problems = [], []
    for name in doc.get("pipelines") or {}:
        try:
            configs.append(_build(name, doc, lines, path, overrides))
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    if not configs:
        raise ConfigError([f"{path}: no pipelines defined under `pipelines:`"])
    return configs


def pipeline_names(file: str | Path = DEFAULT_FILE) -> list[str]:
    doc, _, _ = _read(file)
    return list(doc.get("pipelines") or {})


def parse_override(item: str) -> tuple[list[str], Any]:
    """`dpo.beta=0.2` -> (["dpo", "beta"], 0.2); the value is read as YAML, so lists and numbers work."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"--set {item!r}: expected KEY.PATH=VALUE"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError([f"--set {item!r}: value is not valid YAML ({e.problem})"]) from None
    return key.strip().split("."), value


def _read(file: str | Path) -> tuple[dict, dict[tuple, int], Path]:
    path = Path(file).resolve()
    if not path.is_file():
        raise ConfigError([f"{file}: file not found"])
    text = path.read_text(encoding="utf-8")
    try:
        doc = yaml.safe_load(text) or {}
        lines = _key_lines(yaml.compose(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([f"{where}: invalid YAML: {getattr(e, 'problem', e)}"]) from None
    if not isinstance(doc, dict):
        raise ConfigError([f"{path}: expected a mapping with `pipelines:` at the top"])
    unknown = set(doc) - TOP_LEVEL_KEYS
    if unknown:
        raise ConfigError([f"{path}:{lines.get((k,), '?')}: {k}: unknown top-level key (allowed: defaults, pipelines)"
                           for k in sorted(unknown)])
    for key in TOP_LEVEL_KEYS:
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            raise ConfigError([f"{path}:{lines.get((key,), '?')}: {key}: expected a mapping"])
    return doc, lines, path


def _build(name: str, doc: dict, lines: dict, path: Path, overrides: list[str]) -> PipelineConfig:
    entry = doc["pipelines"][name]
    if entry is not None and not isinstance(entry, dict):
        raise ConfigError([f"{path}:{lines.get(('pipelines', name), '?')}: pipelines.{name}: expected a mapping"])
    merged = _deep_merge(copy.deepcopy(doc.get("defaults") or {}), entry or {})
    overridden: set[tuple] = set()
    for item in overrides:
        keys, value = parse_override(item)
        _set_path(merged, keys, value, item)
        overridden.add(tuple(keys))
    merged["name"] = name
    try:
        config = PipelineConfig.model_validate(merged)
    except ValidationError as e:
        raise ConfigError([_describe(err, name, lines, path, overridden) for err in e.errors()]) from None
    return _resolve_paths(config, path.parent)


def _describe(err: dict, name: str, lines: dict, path: Path, overridden: set[tuple]) -> str:
    loc = tuple(str(p) for p in err["loc"])
    dotted = ".".join(loc)
    for n in range(len(loc), 0, -1):
        if loc[:n] in overridden:
            return f"--set {'.'.join(loc[:n])}: {dotted}: {err['msg']}"
    for n in range(len(loc), -1, -1):
        for prefix in (("pipelines", name), ("defaults",)):
            line = lines.get(prefix + loc[:n])
            if line is not None:
                where = ".".join(prefix + loc)
                return f"{path}:{line}: {where}: {err['msg']}"
    return f"{path}: pipelines.{name}.{dotted}: {err['msg']}"


def _resolve_paths(config: PipelineConfig, base: Path) -> PipelineConfig:
    def absolute(p: str) -> str:
        return str((base / p).resolve()) if not Path(p).is_absolute() else p

    def located(source: str | SourceSpec) -> str | SourceSpec:
        if isinstance(source, str):
            return absolute(source)
        if source.path is not None:
            return source.model_copy(update={"path": absolute(source.path)})
        hub = Path(source.hub).expanduser()
        if source.hub.startswith((".", "/", "~")) or (base / hub).is_dir():  # a local dataset folder
            return source.model_copy(update={"hub": absolute(str(hub))})
        return source

    data = config.data.model_copy(update={"sources": [located(s) for s in config.data.sources]})
    update: dict[str, Any] = {"data": data, "workdir": absolute(config.workdir)}
    source = config.model.source
    if not source.startswith("builtin:") and (source.startswith((".", "/", "~")) or (base / source).exists()):
        update["model"] = config.model.model_copy(update={"source": absolute(str(Path(source).expanduser()))})
    return config.model_copy(update=update)


def _deep_merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = _deep_merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def _set_path(doc: dict, keys: list[str], value: Any, item: str) -> None:
    node = doc
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError([f"--set {item!r}: {k} is not a section"])
        node = child
    node[keys[-1]] = value


def _key_lines(node: yaml.Node | None, prefix: tuple = ()) -> dict[tuple, int]:
    """(key, path, ...) -> 1-based line of that key in the YAML text."""
    out: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (str(key_node.value),)
            out[path] = key_node.start_mark.line + 1
            out.update(_key_lines(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[prefix + (str(i),)] = item.start_mark.line + 1
            out.update(_key_lines(item, prefix + (str(i),)))
    return out
