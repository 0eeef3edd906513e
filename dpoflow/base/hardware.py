"""The seed recipe's hardware decision tree: which precision, whether to load 4-bit weights, and what
per-device batch and gradient accumulation to train DPO with on a given GPU.

Everything but `detect_gpu` is a pure function of facts passed in, so tests can ask about an H100 or a
24 GiB card on a machine without one. `dpoflow doctor` prints the result for a pipeline.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

GiB = 2**30
FP8_MIN_CC = (8, 9)  # Ada / Hopper: the first GPUs with FP8 tensor cores
FIT_FRACTION = 0.9  # the estimate is rough and the allocator fragments: keep 10% of free memory spare
LORA_RANK = 16  # the LoraSpec default; the adapter is small next to the weights, so its exact r barely matters
# Larger micro-batches ran faster at the same effective batch (docs/benchmarks.md, 8B shape): with
# checkpointing, 4 pairs 8,609 tok/s and 8 pairs 10,242 on an H100; without it, 8 pairs 13,608 and 16 pairs
# 14,236 on an H200. Growing stops where it was measured.
MAX_GROWN_BATCH = {True: 8, False: 16}  # gradient checkpointing on/off -> the largest grown micro-batch
BACKENDS = ("trl", "unsloth")
# Bytes a base weight. NF4 ("4bit") is 0.5 bytes a quantized weight; its block scales add ~0.06.
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "4bit": 0.56}
PRECISIONS = ("auto", "bf16", "fp16", "fp8")
QUANTIZE = ("auto", "none", "4bit")


@dataclass
class GpuFacts:
    name: str
    compute_capability: tuple[int, int]
    total_bytes: int
    free_bytes: int
    bf16_supported: bool
    count: int = 1  # GPUs visible to this process (all the same model, as on one host)


@dataclass
class TrainingPlan:
    precision: str  # "fp32" | "bf16" | "fp16" | "fp8"
    load_in_4bit: bool
    per_device_batch: int
    gradient_accumulation_steps: int
    warnings: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    num_processes: int = 1  # data-parallel training processes (torchrun), one per GPU
    strategy: str = "ddp"  # "ddp" | "fsdp"
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (saves memory, costs ~1/4)
    memory_budget_gib: float | None = None  # train.memory_budget_gib: the most GPU memory the stage may take

    # Left out of a training stage's cache key (dpoflow.base.cache.key_value): they explain the plan, and quote
    # the free memory at planning time, which does not change what training makes.
    not_key: ClassVar[dict[str, str]] = {"warnings": "explains the plan", "reasons": "explains the plan",
                                         "memory_budget_gib": "a cap; the batch and checkpointing it led to are keyed"}


def detect_gpu() -> GpuFacts | None:
    """Facts about CUDA device 0, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)  # free is what this process can still get, not total minus ours
    return GpuFacts(props.name, (props.major, props.minor), total, free, torch.cuda.is_bf16_supported(),
                    torch.cuda.device_count())


def count_parameters(model_dir: str | Path) -> int:
    """Parameters in a model folder's safetensors files, read from the headers only (no weights loaded)."""
    from safetensors import safe_open

    folder = Path(model_dir)
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # a sharded checkpoint: count only the shards it names (some repos also ship a
        # consolidated copy of the same weights next to them)
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
    total = 0
    for path in files:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return total


def model_shape(model_dir: str | Path) -> dict:
    """hidden_size, num_hidden_layers and vocab_size from the folder's config.json."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)  # multimodal configs nest the language model's fields
    return {k: int(config[k]) for k in ("hidden_size", "num_hidden_layers", "vocab_size")}


def estimate_training_bytes(n_params: int, hidden_size: int, num_layers: int, vocab_size: int,
                            per_device_batch: int, seq_len: int, weights: str,
                            gradient_checkpointing: bool = True, backend: str = "trl") -> int:
    """Peak GPU memory of one LoRA DPO step, a deliberately rough estimate that errs high. The parts:

    - base weights (frozen), `weights` one of WEIGHT_BYTES: 2 bytes a parameter bf16/fp16, 1 FP8. 4-bit
      quantizes the linear layers only: the input embedding and the output head (vocab x hidden each)
      stay 16-bit, which at a 128k vocabulary is an eighth of an 8B model;
    - LoRA adapter: rank 16 on the seven Llama projections is ~20 x r x hidden parameters a layer, each
      with an fp32 weight, gradient and two Adam moments (16 bytes);
    - activations: DPO runs chosen and rejected through the model, so 2 x batch x seq_len tokens. A layer
      recomputed in full holds ~34 x hidden bytes a token (Korthikanti et al. 2022, with flash/SDPA
      attention so no seq_len^2 term). Without gradient checkpointing every layer keeps that. With it, one
      layer at a time is recomputed and each layer's 16-bit input (2 x hidden bytes a token) is kept: on
      the GPU by TRL, in CPU memory by Unsloth's checkpointing ("unsloth" offloads them);
    - logits: tokens x vocab. TRL: fp32 with the log-softmax's gradient (8 bytes); Unsloth: bf16 (2).

    Against the measured peaks (docs/benchmarks.md, 8B shape, 512-token sequences): TRL + PEFT 4 pairs
    17.8 GiB, estimated 21.0; Unsloth 8 pairs 17.6 and 16 pairs 19.6 (dpoflow's stage 8 pairs 16.6),
    estimated 18.6 and 21.6; without checkpointing, dpoflow 8 pairs 36.5 and Unsloth 45.4, estimated 51.6;
    Unsloth 4-bit 4 pairs 7.2, estimated 7.7.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    tokens = 2 * per_device_batch * seq_len
    if weights == "4bit":
        sixteen_bit = min(n_params, 2 * vocab_size * hidden_size)
        weight_bytes = (n_params - sixteen_bit) * WEIGHT_BYTES["4bit"] + sixteen_bit * 2
    else:
        weight_bytes = n_params * WEIGHT_BYTES[weights]
    lora = 20 * LORA_RANK * hidden_size * num_layers * 16
    per_layer = 34 * hidden_size * tokens
    offloaded = backend == "unsloth"
    if gradient_checkpointing:
        activations = (0 if offloaded else num_layers * 2 * hidden_size * tokens) + per_layer
    else:
        activations = num_layers * per_layer
    logits = tokens * vocab_size * (2 if offloaded else 8)
    return int(weight_bytes + lora + activations + logits)


def plan_training(gpu: GpuFacts | None, precision: str, quantize: str, n_params: int, shape: dict, seq_len: int,
                  per_device_batch: int, effective_batch: int, num_processes: int = 1,
                  strategy: str = "ddp", grow_batch: bool = True, gradient_checkpointing: bool | None = None,
                  memory_budget_gib: float | None = None, backend: str = "trl") -> TrainingPlan:
    """The decision tree. `precision` is auto|bf16|fp16|fp8, `quantize` auto|none|4bit; an explicit
    request the hardware cannot meet raises ValueError rather than silently training something else.
    `gradient_checkpointing` None lets the memory estimate decide on a GPU (off when everything fits
    without it); `memory_budget_gib` plans as if no more than that were free; `backend` (trl|unsloth,
    the engine that will train) is what the memory estimate assumes keeps what where.

    On a GPU, in this order: the weight format (4-bit only when 16-bit weights do not fit even with
    checkpointing), the micro-batch grown while it fits with checkpointing, checkpointing off if that
    batch fits without it, and then the micro-batch grown further while it fits without. At one batch no
    recomputation is faster (8B, H200: 8 pairs 13,608 tok/s without, 10,759 with); a doubled batch with
    recomputation ran as fast as the smaller one without it (10,759 vs 4 pairs without 10,598) in half
    the memory, so the batch comes first."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize {quantize!r}: choose one of {', '.join(QUANTIZE)}")
    plan = TrainingPlan("fp32", False, max(1, per_device_batch), 1, num_processes=num_processes, strategy=strategy,
                        gradient_checkpointing=bool(gradient_checkpointing), memory_budget_gib=memory_budget_gib)
    _check_processes(gpu, plan)
    if gpu is not None and memory_budget_gib is not None:
        budget = int(memory_budget_gib * GiB)
        if budget < gpu.free_bytes:
            plan.reasons.append(f"train.memory_budget_gib {memory_budget_gib:g}: planned for {memory_budget_gib:g} "
                                f"GiB of the {gpu.free_bytes / GiB:.1f} GiB free")
            gpu = replace(gpu, free_bytes=budget)
    if gpu is None:
        if precision == "fp8" or quantize == "4bit":
            raise ValueError(f"{'precision fp8' if precision == 'fp8' else 'quantize 4bit'} needs a CUDA GPU "
                             "and none is visible")
        if precision != "auto":
            plan.warnings.append(f"precision {precision} ignored: no CUDA GPU, training in fp32")
        plan.reasons.append("no CUDA GPU: training on CPU in fp32, no 4-bit (4-bit and FP8 weights need CUDA)")
    else:
        plan.precision = _choose_precision(gpu, precision, plan)
        if plan.precision == "fp8" and quantize == "4bit":
            raise ValueError("precision fp8 and quantize 4bit exclude each other: pick one weight format")
        need = _estimator(n_params, shape, seq_len, backend)
        _fit_memory(gpu, quantize, need, plan)
        if grow_batch and gradient_checkpointing is not False:
            _grow_batch(gpu, need, plan, effective_batch, num_processes, checkpointing=True)
        _choose_checkpointing(gpu, need, plan, gradient_checkpointing)
        if grow_batch and not plan.gradient_checkpointing:
            _grow_batch(gpu, need, plan, effective_batch, num_processes, checkpointing=False)

    # The effective batch is the config's, however many processes share it.
    if num_processes > 1 and plan.per_device_batch * num_processes > effective_batch:
        plan.per_device_batch = max(1, effective_batch // num_processes)
        plan.reasons.append(f"effective batch {effective_batch} over {num_processes} processes: per-device batch "
                            f"{plan.per_device_batch}")
    per_step = plan.per_device_batch * num_processes
    plan.gradient_accumulation_steps = max(1, math.ceil(effective_batch / per_step))
    processes = f" x {num_processes} processes" if num_processes > 1 else ""
    plan.reasons.append(f"per-device batch {plan.per_device_batch}{processes}, effective batch {effective_batch}: "
                        f"gradient accumulation {plan.gradient_accumulation_steps}")
    actual = per_step * plan.gradient_accumulation_steps
    if actual != effective_batch:
        plan.warnings.append(f"effective batch is {actual}, not {effective_batch} "
                             f"({effective_batch} is not a multiple of {per_step})")
    return plan


def _estimator(n_params: int, shape: dict, seq_len: int, backend: str):
    """need(weights, batch, checkpointing) -> estimate_training_bytes for this model, length and engine."""
    def need(weights: str, batch: int, checkpointing: bool = True) -> int:
        return estimate_training_bytes(n_params, shape["hidden_size"], shape["num_hidden_layers"],
                                       shape["vocab_size"], batch, seq_len, weights, checkpointing, backend)
    return need


def _weights(plan: TrainingPlan) -> str:
    return "4bit" if plan.load_in_4bit else plan.precision


def _choose_checkpointing(gpu: GpuFacts, need, plan: TrainingPlan, asked: bool | None) -> None:
    """Recomputation costs about a quarter of a LoRA DPO step's compute (the policy forward runs twice:
    8N instead of 6N FLOPs a token), so it is on only where memory needs it: when the estimate without
    it, at the batch chosen, exceeds the budget."""
    if asked is not None:
        plan.gradient_checkpointing = asked
        plan.reasons.append(f"gradient checkpointing {'on' if asked else 'off'} (train's gradient_checkpointing)")
        return
    without = need(_weights(plan), plan.per_device_batch, False)
    plan.gradient_checkpointing = without > gpu.free_bytes * FIT_FRACTION
    at = f"at per-device batch {plan.per_device_batch}"
    if plan.gradient_checkpointing:
        plan.reasons.append(f"estimated {_gib(without)} without gradient checkpointing {at} exceeds 90% of "
                            f"{gpu.free_bytes / GiB:.1f} GiB free: checkpointing on (activations recomputed)")
    else:
        plan.reasons.append(f"estimated {_gib(without)} without gradient checkpointing {at} fits in "
                            f"{gpu.free_bytes / GiB:.1f} GiB free: checkpointing off (no recomputation, ~1/4 "
                            "less compute a step)")


def _grow_batch(gpu: GpuFacts, need, plan: TrainingPlan, effective_batch: int, num_processes: int,
                checkpointing: bool) -> None:
    """Double the per-device batch while the estimate (with or without checkpointing) fits, the doubled
    batch still divides the effective batch evenly over the processes (so gradient accumulation keeps it
    exactly) and it stays within MAX_GROWN_BATCH."""
    start = batch = plan.per_device_batch
    weights = _weights(plan)
    while (batch * 2 <= MAX_GROWN_BATCH[checkpointing] and effective_batch % (batch * 2 * num_processes) == 0
           and need(weights, batch * 2, checkpointing) <= gpu.free_bytes * FIT_FRACTION):
        batch *= 2
    if batch > start:
        plan.per_device_batch = batch
        plan.reasons.append(f"estimated {_gib(need(weights, batch, checkpointing))} at per-device batch {batch} "
                            f"{'with' if checkpointing else 'without'} checkpointing fits in "
                            f"{gpu.free_bytes / GiB:.1f} GiB free: batch raised from {start}, fewer accumulation "
                            "steps, same effective batch (larger micro-batches ran faster; train.grow_batch false "
                            "keeps it)")


def _check_processes(gpu: GpuFacts | None, plan: TrainingPlan) -> None:
    n = plan.num_processes
    if n == 1:
        return
    if gpu is None:
        plan.reasons.append(f"{n} processes on CPU (gloo): data-parallel, for testing the multi-GPU path")
        if plan.strategy == "fsdp":
            raise ValueError("distributed.strategy fsdp needs CUDA GPUs; use ddp to test on CPU")
        return
    if n > gpu.count:
        raise ValueError(f"distributed.num_processes {n} needs {n} GPUs; {gpu.count} visible")
    plan.reasons.append(f"{n} of {gpu.count} GPUs, {plan.strategy.upper()} through torchrun"
                        + (": weights sharded across GPUs" if plan.strategy == "fsdp" else
                           ": every GPU holds the model, LoRA gradients all-reduced"))


def _choose_precision(gpu: GpuFacts, precision: str, plan: TrainingPlan) -> str:
    cc = f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}"
    fp8_ok = tuple(gpu.compute_capability) >= FP8_MIN_CC
    if precision == "fp8":
        if not fp8_ok:
            raise ValueError(f"precision fp8 needs compute capability >= 8.9; {gpu.name} has {cc}")
        plan.reasons.append(f"compute capability {cc} >= 8.9 and train.precision fp8 asked: FP8 weights")
        # docs/benchmarks.md: with Unsloth's compile the first FP8 step never finished; without it FP8 ran
        # at about half of bf16's tokens/s (1B on an H100, 8B on an H200).
        plan.warnings.append("FP8 needs UNSLOTH_COMPILE_DISABLE=1 (Unsloth's compile stalls on FP8 layers) "
                             "and was measured slower than bf16 here (0.56x at 8B on an H200)")
        return "fp8"
    if precision == "bf16" and not gpu.bf16_supported:
        raise ValueError(f"precision bf16: {gpu.name} (compute capability {cc}) has no bf16; use auto or fp16")
    if precision == "auto":
        chosen = "bf16" if gpu.bf16_supported else "fp16"
        plan.reasons.append(f"{gpu.name} (compute capability {cc}) supports bf16: bf16" if gpu.bf16_supported
                            else f"{gpu.name} (compute capability {cc}) has no bf16: fp16")
        if fp8_ok and chosen == "bf16":
            plan.reasons.append(f"compute capability {cc} >= 8.9: FP8 offered via train.precision: fp8, "
                                "but bf16 is chosen: FP8 DPO measured slower here and its compile stalls")
    else:
        chosen = precision
        plan.reasons.append(f"precision {precision} asked")
    if chosen == "fp16":
        # fp16's 5-bit exponent overflows in the policy/reference log-ratios; bf16 has fp32's range.
        plan.warnings.append("fp16 DPO is a known source of NaN losses; prefer a GPU with bf16")
    return chosen


def _fit_memory(gpu: GpuFacts, quantize: str, need, plan: TrainingPlan) -> None:
    """Pick 16-bit (or FP8) vs 4-bit weights and the largest per-device batch (halving down to 1) whose
    estimate with checkpointing fits in FIT_FRACTION of free memory; 4-bit only when the wider weights
    don't fit."""
    budget = gpu.free_bytes * FIT_FRACTION
    free = f"{gpu.free_bytes / GiB:.1f} GiB free"
    wide = (f"{plan.precision} weights", plan.precision, False)
    four = ("4-bit weights", "4bit", True)
    if quantize == "4bit":
        options = [four]
    elif quantize == "none" or plan.precision == "fp8":  # FP8 is already a compressed weight format
        options = [wide]
    else:
        options = [wide, four]

    start = batch = plan.per_device_batch
    while True:
        fitting = [o for o in options if need(o[1], batch) <= budget]
        if fitting or batch == 1:
            break
        batch //= 2  # a smaller batch with more accumulation steps trains the same effective batch
    label, weights, is_4bit = fitting[0] if fitting else options[-1]
    plan.load_in_4bit, plan.per_device_batch = is_4bit, batch
    if not fitting:
        plan.warnings.append(f"estimated {_gib(need(weights, 1))} with {label} at per-device batch 1 "
                             f"exceeds 90% of {free}: expect out-of-memory (shorter max_length or a bigger GPU)")
        return
    if batch < start:
        plan.reasons.append(f"estimated {_gib(need(options[-1][1], start))} with {options[-1][0]} at per-device "
                            f"batch {start} exceeds 90% of {free}: per-device batch halved down to {batch}")
    if is_4bit and quantize == "auto":
        plan.reasons.append(f"estimated {_gib(need(wide[1], batch))} for {wide[0]} + activations exceeds 90% of "
                            f"{free}, {_gib(need(four[1], batch))} with 4-bit weights fits: 4-bit "
                            "(QLoRA, unsloth backend)")
    elif is_4bit:
        plan.reasons.append(f"quantize 4bit asked: estimated {_gib(need(four[1], batch))} with 4-bit weights "
                            f"fits in {free}")
    else:
        why = " (quantize none)" if quantize == "none" else ""
        plan.reasons.append(f"estimated {_gib(need(wide[1], batch))} for {wide[0]} + activations fits in "
                            f"{free}: no 4-bit{why}")


TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "bfloat16"}


def weights_dtype(plan: TrainingPlan) -> str:
    """The torch dtype name to load weights in (FP8 loads bf16 and lets Unsloth quantize)."""
    return TORCH_DTYPES[plan.precision]


def plan_stage(setup, spec, model_dir: str | Path, gpu: GpuFacts | None = None, backend: str = "trl") -> TrainingPlan:
    """The plan for one training stage (its TrainSpec's batch and max_length) on this machine, trained by
    `backend` (dpoflow.engine.backends.choose_backend's name; trl's estimate is the higher one)."""
    gpu = gpu if gpu is not None else detect_gpu()
    return plan_training(gpu, setup.precision, setup.quantize, count_parameters(model_dir), model_shape(model_dir),
                         spec.max_length, spec.per_device_batch_size,
                         spec.per_device_batch_size * spec.gradient_accumulation_steps,
                         setup.distributed.num_processes, setup.distributed.strategy, setup.grow_batch,
                         spec.gradient_checkpointing, setup.memory_budget_gib, backend)


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def describe(plan: TrainingPlan) -> str:
    lines = [
        f"precision:          {plan.precision}",
        f"4-bit weights:      {'yes' if plan.load_in_4bit else 'no'}",
        f"per-device batch:   {plan.per_device_batch}",
        f"grad accumulation:  {plan.gradient_accumulation_steps}",
        f"grad checkpointing: {'on' if plan.gradient_checkpointing else 'off'}",
        f"processes:          {plan.num_processes} ({plan.strategy})" if plan.num_processes > 1 else "processes:          1",
        "why:",
        *(f"  - {r}" for r in plan.reasons),
    ]
    if plan.warnings:
        lines += ["warnings:", *(f"  ! {w}" for w in plan.warnings)]
    return "\n".join(lines)
