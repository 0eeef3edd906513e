"""sft (optional): LoRA supervised fine-tuning on the chosen responses, then the adapter is merged so
DPO starts from (and uses as its reference) the SFT model itself."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from dpoflow.artifacts import fresh_dir, read_jsonl_rows, seal
from dpoflow.backends import BackendError, choose_backend, load_for_training
from dpoflow.config import SFTSpec, TrainSetup
from dpoflow.hardware import TrainingPlan
from dpoflow.records import ModelRef, PreparedData
from dpoflow.training import final_metrics, trainer_args

from . import stage_task


def train_sft(base: ModelRef, data: PreparedData, spec: SFTSpec, setup: TrainSetup, plan: TrainingPlan, seed: int,
              out_dir: Path) -> ModelRef:
    if plan.load_in_4bit or plan.precision == "fp8":
        raise BackendError("sft: merging an adapter into 4-bit/FP8 weights is not supported; "
                           "set train.quantize: none and train.precision: bf16 for SFT, or sft.enabled: false")
    backend = choose_backend(setup)
    model, tokenizer, peft_config = load_for_training(backend, base.path, plan, spec.lora, spec.max_length, seed)
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    fresh_dir(out_dir)
    rows = read_jsonl_rows(data.train)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(**trainer_args(spec, Path(scratch), seed, plan),
                         completion_only_loss=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config)
        trainer.train()
    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    metrics = final_metrics(trainer.state.log_history, ("loss", "mean_token_accuracy"))
    (out_dir / "sft_metrics.json").write_text(json.dumps(metrics, indent=1))
    return ModelRef(path=str(out_dir), digest=seal(out_dir), source=f"sft of {base.source}", role="sft")


@stage_task
def sft_task(stage: str, key: str, out_dir: str, base: ModelRef, data: PreparedData, spec: SFTSpec,
             setup: TrainSetup, plan: TrainingPlan, seed: int) -> ModelRef:
    return train_sft(base, data, spec, setup, plan, seed, Path(out_dir))
