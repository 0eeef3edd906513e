"""The one config schema: `pipelines.yaml`, the CLI's --set and the Prefect parameter form all go
through `PipelineConfig`. Defaults live here and nowhere else.
"""

from __future__ import annotations

import copy
import glob
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dpoflow.base import layouts


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The fields a stage's cache key leaves out, each with why (dpoflow.base.cache.key_value): a section
    # given to a stage is keyed by all its other fields. The one place this is decided.
    not_key: ClassVar[dict[str, str]] = {}


class ModelSpec(Strict):
    source: str = Field(
        "builtin:tiny-llama",
        description="`builtin:NAME` (built in code, offline), a local folder, or a Hugging Face Hub id.",
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit (Hub ids only).")

    not_key: ClassVar[dict[str, str]] = {
        "source": "the model stage is keyed by the model's content instead (models.key_inputs: the built-in "
                  "name, the Hub commit, the PyPI release, a local folder's digest): a folder's path differs "
                  "between clones",
        "revision": "resolved to the Hub commit it names, which models.key_inputs keys",
    }


class SourceSpec(Strict):
    path: str | None = Field(None, description="A local file or glob: .jsonl/.ndjson, .json (a list of rows), "
                                               ".parquet or .csv. Relative paths resolve against pipelines.yaml.")
    hub: str | None = Field(None, description="A Hugging Face Hub dataset id (or a local dataset folder, as "
                                              "written by `datasets`), read with `split` and `revision`.")
    split: str = Field("train", description="Split of the Hub dataset to read (e.g. train_prefs).")
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
    enabled: bool = Field(True, description="Set aside training prompts that overlap an evaluation item.")
    ngram: int = Field(13, ge=3, description="Words in the n-grams a train prompt may not share with an "
                                             "evaluation item (the held-out split and the forgetting-check tasks).")
    template_prompts: int = Field(
        20, ge=1, description="An n-gram found in more prompts than this (train and held-out together) is template "
                              "text, such as an instruction every row repeats, and does not count as contamination.")


Format = Literal[("auto", *layouts.NAMES)]  # every layout can be named, or detected per row


class DataSpec(Strict):
    sources: list[str | SourceSpec] = Field(
        ..., min_length=1,
        description="Where the pairs come from: a path or glob (string), or {path|hub, split, revision, weight|count}.",
    )
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="Share of prompts held out (split by prompt hash).")
    format: Format = Field(
        "auto", description="auto: each row's layout detected (the data report names it per source); or one of: "
                            + "; ".join(f"{x.name}: {x.about}" for x in layouts.LAYOUTS) + ".")
    prefer: Literal["better", "safer"] = Field(
        "better", description="PKU-SafeRLHF rows: chosen by better_response_id (helpfulness) or safer_response_id.")
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
    decontamination: DecontaminationSpec = Field(
        DecontaminationSpec(), description="Keep evaluation items (held-out pairs, forgetting-check tasks) out of training.")
    on_error: Literal["quarantine", "fail"] = Field(
        "quarantine", description="quarantine: keep bad rows aside in rejected.jsonl; fail: stop at the first."
    )

    not_key: ClassVar[dict[str, str]] = {
        "sources": "the prepare stage receives each source with its content fingerprint (records.DataSource) "
                   "and is keyed by that: a file's path differs between clones, its content does not",
    }

    @property
    def source_specs(self) -> list[SourceSpec]:
        return [SourceSpec(path=s) if isinstance(s, str) else s for s in self.sources]


class LoraSpec(Strict):
    r: int = Field(16, ge=1, description="LoRA rank: the size of the low-rank update of each adapted layer.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch during training.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Layers that get an adapter: all-linear, or module names such as [q_proj, v_proj].")


class TrainSpec(Strict):
    learning_rate: float = Field(gt=0, description="Peak learning rate of the optimizer (AdamW).")
    epochs: float = Field(1.0, gt=0, description="Passes over the training pairs (fractions allowed).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: run all epochs).")
    per_device_batch_size: int = Field(4, ge=1, description="Pairs per forward pass on each device (the hardware "
                                                            "plan may raise it and lower accumulation).")
    gradient_accumulation_steps: int = Field(8, ge=1, description="Micro-batches per optimizer step; the effective "
                                                                  "batch is per_device_batch_size x this.")
    max_length: int = Field(512, ge=8, description="Tokens of prompt + completion kept per sequence.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="How the learning rate changes over the steps.")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warm-up from 0 to learning_rate.")
    gradient_checkpointing: bool | None = Field(
        None, description="Recompute activations in the backward pass: less memory, ~1/4 more compute. None: the "
                          "planner decides on a GPU (off when the memory estimate fits without it), off on CPU.")
    logging_steps: int = Field(10, ge=1, description="Log loss and metrics every N optimizer steps.")
    lora: LoraSpec = Field(LoraSpec(), description="The LoRA adapter that is trained.")


class SFTSpec(TrainSpec):
    enabled: bool = Field(False, description="Run LoRA SFT on the chosen answers before DPO (merged into the "
                                             "model DPO starts from).")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate of the optimizer (AdamW).")


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


# Every loss TRL's DPOTrainer computes (1.15 and 1.16 have the same 15; tests/test_dpo_losses.py reads
# the installed TRL's and fails when they differ). Several combine: [sigmoid, sft] is RPO's.
LossName = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
NEEDS_LABEL_SMOOTHING = {"robust": "the probability that a preference label is flipped, e.g. 0.1",
                         "exo_pair": "EXO's epsilon, e.g. 1e-3"}


# The preference objectives the dpo stage trains with. orpo and simpo need no reference model: they
# score the policy's own log-probs (ORPO with its odds ratio plus the SFT loss, SimPO with the per-token
# average and a target margin), so no reference pass runs and the DPO-only settings below are refused.
# kto learns from unpaired examples (a prompt, one completion, a thumbs-up/down label) against the start
# model as reference, like DPO; pairs are split into one desirable and one undesirable example.
Method = Literal["dpo", "orpo", "simpo", "kto"]
REFERENCE_FREE = ("orpo", "simpo")
SIMPO_GAMMA = 0.5  # TRL's default target margin, used when simpo_gamma is not given
# Settings one method alone reads: field -> (that method, the field's default, what it is). Given with
# another method (set away from the default), refused in one line.
METHOD_ONLY = {"loss_type": ("dpo", ["sigmoid"], "TRL's DPO losses"),
               "loss_weights": ("dpo", None, "weights of TRL's DPO losses"),
               "label_smoothing": ("dpo", 0.0, "for DPO's robust and exo_pair losses"),
               "precompute_ref_log_probs": ("dpo", False, "the reference pass; there is no reference model"),
               "simpo_gamma": ("simpo", None, "SimPO's target margin"),
               "desirable_weight": ("kto", None, "weighs KTO's loss on desirable examples"),
               "undesirable_weight": ("kto", None, "weighs KTO's loss on undesirable examples")}
METHOD_NAMES = {"dpo": "DPO", "orpo": "ORPO", "simpo": "SimPO", "kto": "KTO"}


class DPOSpec(TrainSpec):
    learning_rate: float = Field(5e-6, gt=0, description="Peak learning rate of the optimizer (AdamW).")
    method: Method = Field(
        "dpo", description="The preference objective. dpo: TRL's DPOTrainer, the start model (adapter off) as the "
                           "reference. orpo: odds-ratio preference plus the SFT loss on the chosen answers in one "
                           "step, no reference model (sft.enabled is skipped: ORPO trains that term itself). simpo: "
                           "the per-token average log-prob margin with a target margin simpo_gamma, no reference "
                           "model (TRL's CPOTrainer with loss_type simpo, cpo_alpha 0). kto: KTO on unpaired "
                           "examples (prompt, completion, label true/false; pairs are split into one of each), the "
                           "start model (adapter off) as the reference (TRL's KTOTrainer). What beta means depends "
                           "on it.")
    beta: float = Field(
        0.1, gt=0, description="dpo: DPO's beta, how far the policy may move from the reference (higher: closer to "
                               "it; 0.1 typical). orpo: ORPO's lambda, the weight of the odds-ratio term against the "
                               "SFT loss (0.1 typical). simpo: SimPO's beta, the scale of the per-token average "
                               "log-prob margin (2-10 in the SimPO paper). kto: KTO's beta, how far the policy may "
                               "move from the reference (0.1 typical).")
    simpo_gamma: float | None = Field(
        None, ge=0, description=f"simpo only: SimPO's target margin gamma between chosen and rejected rewards (None: "
                                f"{SIMPO_GAMMA}). The paper tunes gamma / beta around 0.5.")
    desirable_weight: float | None = Field(
        None, gt=0, description="kto only: weight of the loss on desirable (label true) examples (None: 1.0). With "
                                "fewer desirable than undesirable examples, raise it so weight x count is about "
                                "equal, or up to 4/3 of that (the KTO paper).")
    undesirable_weight: float | None = Field(
        None, gt=0, description="kto only: weight of the loss on undesirable (label false) examples (None: 1.0).")
    loss_type: list[LossName] = Field(
        ["sigmoid"], min_length=1,
        description="TRL's DPO loss terms, summed with loss_weights: sigmoid (DPO), hinge (SLiC), ipo, robust and "
                    "exo_pair (both need label_smoothing), nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, "
                    "apo_zero, apo_down, discopop, sigmoid_norm (length-normalised), sft (NLL on chosen), e.g. "
                    "[sigmoid, sft] with loss_weights [1.0, 0.2].")
    loss_weights: list[float] | None = Field(None, description="One weight per loss_type entry (None: all 1).")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="For robust (the probability that a preference label is flipped, e.g. 0.1) "
                                       "and exo_pair (its epsilon, e.g. 1e-3); other losses ignore it.")
    precompute_ref_log_probs: bool = Field(
        False, description="Compute the reference log-probs once as a cached artifact, reused by runs that "
                           "differ only in beta, lr or loss.")
    share_prompt: bool = Field(
        True, description="Run each pair's prompt once, with chosen and rejected both attending to it, instead of "
                          "once per answer: the same log-probs from fewer tokens (dpoflow/engine/prompt_sharing.py).")
    guards: GuardSpec = Field(GuardSpec(), description="Checkpoints, and what stops or retries a diverging run.")

    @field_validator(*METHOD_ONLY)
    @classmethod
    def _set_only_for_the_method_that_reads_it(cls, value, info):
        owner, default, what = METHOD_ONLY[info.field_name]
        method = info.data.get("method", "dpo")  # absent when method itself was refused
        if method != owner and value != default:
            raise ValueError(f"{info.field_name} is {METHOD_NAMES[owner]} only ({what}); method {method} does not "
                             f"read it: remove it or set dpo.method: {owner}")
        return value

    @model_validator(mode="after")
    def _kto_needs_two_per_batch(self):
        # TRL's KTO estimates its KL term from the other completions of the same micro-batch.
        if self.method == "kto" and self.per_device_batch_size < 2:
            raise ValueError("kto estimates its KL term from the other examples of a micro-batch: "
                             "per_device_batch_size must be at least 2")
        return self

    @property
    def reference_free(self) -> bool:
        return self.method in REFERENCE_FREE

    @property
    def reward_beta(self) -> float:
        """The beta of DPO's implicit reward, beta * (log p - log p_start), that evaluation reports: DPO's own;
        1 for a reference-free method, whose beta is no weight on that log-ratio (the margin is then in nats)."""
        return 1.0 if self.reference_free else self.beta

    @model_validator(mode="after")
    def _weights_match_losses(self):
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} entries for "
                             f"{len(self.loss_type)} loss_type entries")
        for loss in self.loss_type:
            if loss in NEEDS_LABEL_SMOOTHING and self.label_smoothing == 0:
                # robust with 0 is exactly sigmoid; TRL refuses exo_pair with 0
                raise ValueError(f"loss_type {loss} needs label_smoothing > 0 ({NEEDS_LABEL_SMOOTHING[loss]})")
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
    memory_budget_gib: float | None = Field(
        None, gt=0, description="The most GPU memory a training stage may take: the planner picks batch, weight "
                                "format and checkpointing to fit it, and the process is held to it (to share a GPU, "
                                "or to plan as on a smaller card). None: 90% of what is free.")
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
    min_win_rate: float | None = Field(
        None, ge=0, le=1, description="Least judged win rate of the tuned model over the start model (0-1, ties "
                                      "count half); needs evaluate.judge.")
    min_lc_win_rate: float | None = Field(
        None, ge=0, le=1, description="Least length-controlled judged win rate (0-1); needs evaluate.judge.")
    max_length_growth: float | None = Field(
        None, gt=0, description="Largest mean answer length of the tuned model over the start model's (1.2: at "
                                "most 20% longer); needs evaluate.judge.")


class JudgeSpec(Strict):
    enabled: bool = Field(
        False, description="Generate answers from the start and the tuned model and have a judge compare them, "
                           "each pair in both orders (a win counts only when both orders agree).")
    kind: Literal["reward_model", "openai"] = Field(
        "reward_model", description="reward_model: a sequence-classification reward model scores each answer; "
                                    "openai: a chat model behind an OpenAI-compatible endpoint compares the two.")
    model: str | None = Field(
        None, description="reward_model: a local folder, a Hub id, or builtin:tiny-reward (trained in seconds on "
                          "the run's own pairs, for demos and tests); openai: the model name sent to the endpoint.")
    url: str | None = Field(None, description="openai: the endpoint's base URL, e.g. http://127.0.0.1:8080/v1.")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="openai: the environment variable holding the API key (unset: no key sent).")
    api_key_secret: str | None = Field(
        None, description="openai: name of a Prefect Secret block holding the API key (instead of api_key_env).")
    extra_body: dict[str, Any] = Field(
        {}, description="openai: more fields sent with every request, e.g. llama.cpp's response_format with a "
                        "JSON schema, or vLLM's guided_choice.")
    max_attempts: int = Field(3, ge=1, description="openai: tries per request on connection errors, 429 and 5xx.")
    timeout_seconds: float = Field(120, gt=0, description="openai: seconds to wait for one answer.")
    prompts_file: str | None = Field(
        None, description="A JSONL file of {prompt: ...} rows (plain questions) judged besides the held-out prompts; "
                          "relative to pipelines.yaml.")
    limit: int | None = Field(64, ge=1, description="Held-out prompts judged (the first N; None: all).")
    max_new_tokens: int = Field(128, ge=1, description="Tokens each model may generate per answer.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature of the answers (0: greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling share (with temperature > 0).")
    seed: int = Field(0, description="Seed of the answers' sampling.")
    batch_size: int = Field(16, ge=1, description="Prompts generated (and answers scored) at once.")

    not_key: ClassVar[dict[str, str]] = {
        "api_key_env": "where the key comes from, not what the judge says",
        "api_key_secret": "where the key comes from, not what the judge says",
        "max_attempts": "how often a dropped request is tried again",
        "timeout_seconds": "how long one answer is waited for",
        "batch_size": "how many prompts are generated or scored at once",
    }

    @model_validator(mode="after")
    def _judge_named(self):
        if self.enabled and self.kind == "reward_model" and not self.model:
            raise ValueError("judge kind reward_model needs judge.model (a folder, a Hub id or builtin:tiny-reward)")
        if self.enabled and self.kind == "openai" and not self.url:
            raise ValueError("judge kind openai needs judge.url (the endpoint, e.g. http://127.0.0.1:8080/v1)")
        if self.enabled and self.kind == "openai" and (self.model or "").startswith("builtin:"):
            raise ValueError(f"judge.model {self.model} is a reward model; kind openai takes the endpoint's model "
                             "name (or null for the server's default)")
        return self


class EvaluateSpec(Strict):
    enabled: bool = Field(True, description="Run the forgetting check (start model vs tuned) and its gate.")
    batch_size: int = Field(16, ge=1, description="lm-evaluation-harness batch size.")
    tasks: list[str] = Field(
        ["dpoflow_knowledge", "dpoflow_arithmetic", "dpoflow_reading", "dpoflow_instructions", "dpoflow_preference"],
        description="lm-evaluation-harness tasks of the forgetting check. The dpoflow_* tasks ship with dpoflow "
                    "(dpoflow_preference: the held-out pairs); registry tasks (hellaswag, arc_easy, ...) need "
                    "the network.")
    limit: int | None = Field(None, ge=1, description="Items per task (None: all).")
    gate: GateSpec = Field(GateSpec(), description="What the forgetting check lets through to export and publish.")
    judge: JudgeSpec = Field(JudgeSpec(), description="Answers of the start and tuned model, judged pairwise.")

    @model_validator(mode="after")
    def _judge_gate_needs_judge(self):
        wanted = [k for k in ("min_win_rate", "min_lc_win_rate", "max_length_growth")
                  if getattr(self.gate, k) is not None]
        if wanted and not self.judge.enabled:
            raise ValueError(f"evaluate.gate.{wanted[0]} needs evaluate.judge.enabled")
        return self

    not_key: ClassVar[dict[str, str]] = {
        "gate": "a policy applied to the cached scores on every run: a new threshold judges them again without "
                "scoring anything again",
        "judge": "scored by its own stages (answers, judge): a generation or judge setting re-runs only those",
    }


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
    enabled: bool = Field(False, description="Push the exports and the model card to the Hub after the forgetting "
                                             "check passed.")
    repo_id: str | None = Field(None, description="Hub model repo, e.g. my-org/my-model-dpo (created if missing).")
    private: bool = Field(True, description="Create the repo private.")
    revision: str = Field("main", description="Branch to commit to (created from main if missing).")
    include: list[Literal["adapter", "merged", "gguf"]] = Field(
        ["adapter", "merged", "gguf"], description="Which exports to upload (those that were made).")
    token_secret: str | None = Field(
        None, description="Name of a Prefect Secret block holding the Hub token; default: the HF_TOKEN variable.")
    endpoint: str | None = Field(None, description="Hub URL (default: HF_ENDPOINT or https://huggingface.co).")
    max_attempts: int = Field(5, ge=1, description="Tries on 5xx answers and dropped connections, with backoff.")

    not_key: ClassVar[dict[str, str]] = {
        "token_secret": "where the credentials come from, not what is pushed",
        "max_attempts": "how often a flaky upload is tried: the release it makes is the same",
    }

    @model_validator(mode="after")
    def _repo_when_enabled(self):
        if self.enabled and not self.repo_id:
            raise ValueError("publish.enabled needs publish.repo_id")
        return self


class ScheduleSpec(Strict):
    cron: str | None = Field(None, description="Cron expression, e.g. '0 3 * * 1' (Mondays 03:00).")
    interval_seconds: int | None = Field(None, ge=60, description="Run every N seconds instead of a cron.")
    timezone: str = Field("UTC", description="IANA time zone of the cron expression, e.g. Europe/Paris.")
    active: bool = Field(True, description="False: the schedule is kept but creates no runs.")

    @model_validator(mode="after")
    def _cron_or_interval(self):
        if (self.cron is None) == (self.interval_seconds is None):
            raise ValueError("give exactly one of cron or interval_seconds")
        return self


class DeploySpec(Strict):
    enabled: bool = Field(False, description="Make this pipeline a Prefect deployment (dpoflow sync / serve).")
    schedules: list[ScheduleSpec] = Field([], description="When runs start on their own (none: only on demand).")
    paused: bool = Field(False, description="Keep the deployment's schedules from creating runs.")
    work_pool: str | None = Field(None, description="Work pool whose workers run it (`dpoflow sync` registers it); "
                                                    "None: `dpoflow serve` registers it and runs it on its machine.")
    work_queue: str | None = Field(None, description="Queue of the work pool (None: its default queue).")
    job_variables: dict[str, Any] = Field({}, description="Work pool job variables, e.g. {image: ..., "
                                                          "env: {...}} or GPU requests for Kubernetes.")
    tags: list[str] = Field([], description="Extra Prefect tags of the deployment and its runs.")
    repository: str | None = Field(
        None, description="Git URL the worker clones the code from, at the commit `dpoflow sync` ran on; "
                          "None: the worker runs the code where `dpoflow sync` ran (one machine).")
    concurrency_limit: int | None = Field(
        1, ge=1, description="Runs of this deployment at once; later ones wait in line (one GPU, one shared "
                             "workdir: 1). None: no limit.")


class TrackingSpec(Strict):
    backend: Literal["none", "mlflow", "wandb", "trackio", "tensorboard"] = Field(
        "none", description="Where each run's config, training curves, evaluation figures and reports are sent: "
                            "none, mlflow, wandb (Weights & Biases; offline unless configured), trackio "
                            "(Hugging Face's local tracker) or tensorboard (event files). The clients come "
                            "with the tracking extra: pip install 'dpoflow[tracking]'.")
    uri: str | None = Field(
        None, description="mlflow: the tracking URI, e.g. sqlite:///mlruns.db, file:/path/mlruns or "
                          "http://host:5000; wandb: a W&B server, e.g. https://api.wandb.ai (the run is online); "
                          "trackio and tensorboard: the folder. None: mlflow.db, trackio/ or tensorboard/ in the "
                          "workdir; wandb: online when WANDB_API_KEY is set, else an offline run in "
                          "<workdir>/wandb.")
    experiment: str | None = Field(None, description="MLflow experiment, W&B or Trackio project (tensorboard: a "
                                                     "subfolder of the log folder); None: the pipeline's name.")
    tags: dict[str, str] = Field({}, description="More tags set on every tracked run, e.g. {team: nlp}.")

    not_key: ClassVar[dict[str, str]] = {
        "uri": "where the run is sent, not what is trained; it may hold a password, so the model card leaves it out",
        "tags": "labels of the tracked run, not of the model",
    }


class PipelineConfig(Strict):
    name: str = Field(description="The pipeline's name: its key under `pipelines:`.")
    description: str = Field("", description="Free text shown on the Prefect deployment and in the model card.")
    workdir: str = Field(".dpoflow", description="Cache, stage outputs and run folders; relative to pipelines.yaml.")
    seed: int = Field(42, description="Seed of data order, adapter initialisation and sampling.")
    cpu_threads: int | None = Field(None, ge=1, description="torch threads on CPU (None: torch's default).")
    model: ModelSpec = Field(ModelSpec(), description="The base model to align.")
    train: TrainSetup = Field(TrainSetup(), description="How training runs: backend, precision, quantization, GPUs.")
    data: DataSpec = Field(description="The preference data and how it is cleaned and split.")
    sft: SFTSpec = Field(SFTSpec(), description="Optional LoRA SFT before DPO.")
    dpo: DPOSpec = Field(DPOSpec(), description="The preference stage (LoRA): DPO against the start model with the "
                                                "adapter off, or a reference-free ORPO or SimPO (dpo.method).")
    evaluate: EvaluateSpec = Field(EvaluateSpec(), description="The forgetting check and its gate.")
    export: ExportSpec = Field(ExportSpec(), description="What the tuned model is exported as.")
    publish: PublishSpec = Field(PublishSpec(), description="Pushing the release to the Hugging Face Hub.")
    deploy: DeploySpec = Field(DeploySpec(), description="The pipeline as a Prefect deployment (dpoflow sync / serve).")
    tracking: TrackingSpec = Field(TrackingSpec(), description="An experiment tracker (MLflow, W&B, Trackio, TensorBoard) each run "
                                                               "is sent to.")

    @property
    def runs_sft(self) -> bool:
        """Whether the sft stage runs: sft.enabled, unless the method trains the SFT term itself."""
        return self.sft.enabled and self.sft_skipped is None

    @property
    def sft_skipped(self) -> str | None:
        """Why sft.enabled is not followed, or None."""
        if self.sft.enabled and self.dpo.method == "orpo":
            return ("sft skipped although sft.enabled: dpo.method orpo trains the SFT loss on the chosen answers "
                    "in its own step, so it starts from the base model")
        return None

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
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except yaml.YAMLError as e:
        why = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError([f"--set {item!r}: value is not valid YAML ({why})"]) from None
    except RecursionError:
        raise ConfigError([f"--set {item!r}: value is not valid YAML (nested too deeply)"]) from None
    return key.strip().split("."), value


def _read(file: str | Path) -> tuple[dict, dict[tuple, int], Path]:
    path = Path(file).resolve()
    if not path.is_file():
        raise ConfigError([f"{file}: file not found"])
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a BOM (some Windows editors write one) is encoding, not content
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError([f"{path}:{line}: byte {e.start} is not UTF-8 ({e.reason}); save the file as UTF-8"]) \
            from None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        lines = _key_lines(node)  # before constructing: merge keys (<<) rewrite the nodes they sit in
        doc = (loader.construct_document(node) if node is not None else None) or {}
    except yaml.YAMLError as e:
        raise ConfigError([_yaml_problem(e, path, text)]) from None
    except RecursionError:
        raise ConfigError([f"{path}: invalid YAML: nested too deeply"]) from None
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


def _yaml_problem(e: yaml.YAMLError, path: Path, text: str) -> str:
    """One line, `path:line: invalid YAML: why`, for any error PyYAML raises."""
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow (control characters)
        line = text[:e.position].count("\n") + 1
        return f"{path}:{line}: invalid YAML: {e.reason} (character #x{e.character:04x})"
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark else str(path)
    return f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}"


class _Loader(yaml.SafeLoader):
    """Reads pipelines.yaml (and --set values). PyYAML's safe loader with two refusals, both made
    while composing, before anything is built:

    - a key given twice in one mapping: YAML requires unique keys, and PyYAML would silently keep
      the last one, so a pipeline would run with a value its author thought was overridden;
    - aliases that expand to more than MAX_ALIAS_NODES nodes, or that refer to the node holding
      them. An alias is parsed as a reference, but every later step (line index, merging defaults,
      validation) walks it as a copy: a 1 KB file of nested aliases ("billion laughs") would be
      billions of nodes, and a recursive anchor an endless walk.
    The pure-Python loader is used: the C one composes in C, out of reach of these checks (a
    pipelines file is small, so its speed does not matter here)."""

    MAX_ALIAS_NODES = 10_000

    def __init__(self, stream):
        super().__init__(stream)
        self.open_anchors: set[str] = set()  # anchors of nodes being composed
        self.alias_nodes = 0  # nodes that aliases expanded to so far
        self.sizes: dict[int, int] = {}  # id(node) -> nodes it expands to (memoized: shared nodes)

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self.open_anchors:
                raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} is inside the node it "
                                                  "refers to (a recursive anchor)", event.start_mark)
            node = super().compose_node(parent, index)
            self.alias_nodes += self._size(node)
            if self.alias_nodes > self.MAX_ALIAS_NODES:
                raise yaml.composer.ComposerError(None, None, f"aliases expand to more than {self.MAX_ALIAS_NODES} "
                                                  "nodes (nested aliases; a config never needs that many)",
                                                  event.start_mark)
            return node
        if event.anchor is None:
            return super().compose_node(parent, index)
        self.open_anchors.add(event.anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self.open_anchors.discard(event.anchor)

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple, int] = {}  # (tag, text) of each key -> its line
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue  # `<<` merges may repeat; what they merge is meant to be overridden
            line = key.start_mark.line + 1
            if (key.tag, key.value) in seen:
                raise yaml.composer.ComposerError(
                    None, None, f"key {key.value!r} is given twice in one mapping (lines {seen[key.tag, key.value]} "
                                f"and {line}); YAML would keep only the last", key.start_mark)
            seen[key.tag, key.value] = line
        return node

    def _size(self, node: yaml.Node) -> int:
        if id(node) not in self.sizes:
            if isinstance(node, yaml.SequenceNode):
                children = node.value
            elif isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            else:
                children = []
            self.sizes[id(node)] = 1 + sum(self._size(c) for c in children)
        return self.sizes[id(node)]


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
    config = _resolve_paths(config, path.parent)
    # A work pool's runs read data on the worker's machine: only paths inside the repository (which the
    # worker clones) can be checked here, e.g. by `dpoflow sync` on CI.
    within = path.parent if config.deploy.work_pool else None
    missing = [_describe({"loc": loc, "msg": msg}, name, lines, path, overridden)
               for loc, msg in _missing(config, within)]
    if missing:
        raise ConfigError(missing)
    return config


def _missing(config: PipelineConfig, within: Path | None = None) -> list[tuple[tuple, str]]:
    """(field, why) for each local data file, glob or folder and local model folder that is not
    there: said when the config loads, rather than after a run has started. Hub ids and `builtin:` /
    `pypi:` models are not looked for on disk (only local paths are absolute once resolved); with
    `within`, neither are paths outside that folder."""
    problems = []
    for i, source in enumerate(config.data.source_specs):
        if within is not None and not Path(source.path or source.hub).is_relative_to(within):
            continue
        if source.path is not None:
            if glob.has_magic(source.path):
                if not any(Path(p).is_file() for p in glob.iglob(source.path, recursive=True)):
                    problems.append((("data", "sources", i), f"{source.path}: no file matches this pattern"))
            elif not Path(source.path).is_file():
                problems.append((("data", "sources", i), f"{source.path}: data file not found"))
        elif Path(source.hub).is_absolute() and not Path(source.hub).is_dir():
            problems.append((("data", "sources", i), f"{source.hub}: local dataset folder not found"))
    judge = config.evaluate.judge
    if judge.enabled and judge.prompts_file and (within is None or Path(judge.prompts_file).is_relative_to(within)) \
            and not Path(judge.prompts_file).is_file():
        problems.append((("evaluate", "judge", "prompts_file"), f"{judge.prompts_file}: prompts file not found"))
    model = config.model.source
    if within is not None and not Path(model).is_relative_to(within):
        return problems
    if Path(model).is_absolute() and not Path(model).is_dir():
        problems.append((("model", "source"), f"{model}: local model folder not found"))
    return problems


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
    judge = config.evaluate.judge
    judged: dict[str, Any] = {}
    if judge.prompts_file:
        judged["prompts_file"] = absolute(str(Path(judge.prompts_file).expanduser()))
    if judge.kind == "reward_model" and judge.model and not judge.model.startswith("builtin:") and (
            judge.model.startswith((".", "/", "~")) or (base / judge.model).exists()):  # a local reward model
        judged["model"] = absolute(str(Path(judge.model).expanduser()))
    if judged:
        update["evaluate"] = config.evaluate.model_copy(update={"judge": judge.model_copy(update=judged)})
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
