"""What SFT and DPO share: Trainer arguments from a TrainSpec, the LoRA config, metrics from logs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpoflow.base.config import LoraSpec, TrainSpec
from dpoflow.base.ranks import is_main_process, world_size


def lora_config(spec: LoraSpec):
    from peft import LoraConfig

    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        task_type="CAUSAL_LM",
    )


def trainer_args(spec: TrainSpec, scratch_dir: Path, seed: int, plan) -> dict[str, Any]:
    """Keyword arguments shared by SFTConfig and DPOConfig (both are transformers TrainingArguments);
    batch, accumulation, precision and gradient checkpointing come from the hardware plan."""
    import torch

    on_gpu = torch.cuda.is_available()
    checkpointing = plan.gradient_checkpointing  # asked for, or chosen by the planner from the memory estimate
    return dict(**_parallel_args(plan, checkpointing),
        output_dir=str(scratch_dir),
        learning_rate=spec.learning_rate,
        num_train_epochs=spec.epochs,
        max_steps=spec.max_steps,
        per_device_train_batch_size=plan.per_device_batch,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        max_length=spec.max_length,
        lr_scheduler_type=spec.lr_scheduler,
        warmup_steps=spec.warmup_steps,
        logging_steps=spec.logging_steps,
        gradient_checkpointing=checkpointing,
        # TRL's defaults assume a bf16 GPU; follow the weights instead.
        bf16=on_gpu and plan.precision in ("bf16", "fp8"),
        fp16=on_gpu and plan.precision == "fp16",
        use_cpu=not on_gpu,
        seed=seed,
        data_seed=seed,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
    )


def _parallel_args(plan, checkpointing: bool) -> dict[str, Any]:
    """DDP or FSDP settings, when this process is one of several ranks (see dpoflow.engine.distributed)."""
    if world_size() == 1:
        return {}
    # Every LoRA parameter gets a gradient each step, so DDP need not search for unused ones; reentrant
    # checkpointing would mark them ready twice under DDP.
    args: dict[str, Any] = {"ddp_find_unused_parameters": False}
    if checkpointing:
        args["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if plan.strategy == "fsdp":
        # Trainer wraps each decoder layer (and PEFT's LoRA layers) and gathers a full state dict to save.
        args.update(fsdp=True, fsdp_config={"version": 2, "reshard_after_forward": True,
                                            "state_dict_type": "FULL_STATE_DICT"})
    return args


def keep_outputs_fp32(trainer) -> None:
    """Under FSDP2, accelerate's bf16 policy casts every sharded module's output to bf16, the model's
    own included: TRL's fp32 per-token log-probs get rounded, their sums over a completion err by
    whole nats and the DPO loss is noise (measured: step-1 loss 0.69141, bf16's ln 2, then three values
    repeating). No output cast, then; gradients are reduced in fp32. (Casting outputs to fp32 instead
    fails: fp32 activations then meet bf16 weights.) Call before `train()` wraps the model."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if not trainer.is_fsdp_enabled or plugin is None or plugin.fsdp_version != 2:
        return
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = plugin.mixed_precision_policy
    param_dtype = policy.param_dtype if policy is not None else None
    plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def save_adapter(trainer, folder: Path, adapter: str = "default") -> None:
    """The trained LoRA adapter only, on the main process. Under FSDP every rank must take part: the
    Trainer gathers the sharded weights first."""
    if trainer.is_fsdp_enabled:
        trainer.save_model(str(folder))
        if is_main_process():
            (folder / "training_args.bin").unlink(missing_ok=True)  # a pickle of run-specific paths
        return
    if is_main_process():
        trainer.model.save_pretrained(folder, selected_adapters=[adapter])


def step_clock(file: Path):
    """A Trainer callback that writes the wall-clock time of every optimizer step's end (GPU work
    included) and the peak GPU memory of the main process to a JSON file, for benchmarks."""
    import time

    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):
            if is_main_process():
                peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
                reserved = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None
                file.write_text(json.dumps({"step_end_times": self.times, "peak_allocated_gib": peak,
                                            "peak_reserved_gib": reserved}))

    return StepClock()


def time_split(stage: str, began: float, log):
    """A Trainer callback that says, when training ends, where the stage's time went: setup before the
    first step (model load, data, trainer), the first step (where Unsloth and torch.compile compile),
    and the other steps. One log line, on the main process; wall-clock, so never in a sealed output."""
    import time

    import torch
    from transformers import TrainerCallback

    def now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    class TimeSplit(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.begin, self.first, self.steps = now(), None, 0

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1
            if self.first is None:
                self.first = now()

        def on_train_end(self, args, state, control, **kwargs):
            if not is_main_process() or self.first is None:
                return
            end = now()
            log(f"{stage}: {self.begin - began:.1f} s to the first step (load, data, trainer), first step "
                f"{self.first - self.begin:.1f} s (compiling, where the backend compiles), "
                f"{self.steps - 1} more steps {end - self.first:.1f} s")

    return TimeSplit()


# Wall-clock figures differ on every run; kept out of sealed outputs so equal training gives equal digests.
_TIMING = ("runtime", "per_second")


def deterministic_log(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in entry.items() if not any(t in k for t in _TIMING)} for entry in log_history]


def final_metrics(log_history: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, float]:
    """The last logged value of each of `keys`, plus the mean train loss."""
    out: dict[str, float] = {}
    for entry in log_history:
        for k in keys + ("train_loss",):
            if k in entry:
                out[k] = float(entry[k])
    return out
