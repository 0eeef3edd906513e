"""What SFT and DPO share: Trainer arguments from a TrainSpec, the LoRA config, metrics from logs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import LoraSpec, TrainSpec


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
    batch, accumulation and precision come from the hardware plan."""
    import torch

    on_gpu = torch.cuda.is_available()
    checkpointing = spec.gradient_checkpointing if spec.gradient_checkpointing is not None else on_gpu
    return dict(
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
