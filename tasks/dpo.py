"""dpo: TRL DPOTrainer with a fresh LoRA adapter and `ref_model=None`, so the reference log-probs come
from the same weights with the adapter switched off: the start model (SFT-merged, or the base)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from dpoflow.artifacts import fresh_dir, read_jsonl_rows, seal
from dpoflow.backends import choose_backend, load_for_training
from dpoflow.config import DPOSpec, TrainSetup
from dpoflow.models import torch_dtype
from dpoflow.records import ModelRef, PreparedData, TrainedAdapter
from dpoflow.training import deterministic_log, final_metrics, trainer_args

from . import stage_task

LOGGED = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
          "logps/chosen", "logps/rejected")


def train_dpo(start: ModelRef, data: PreparedData, spec: DPOSpec, setup: TrainSetup, dtype: str, seed: int,
              out_dir: Path, callbacks: tuple = ()) -> TrainedAdapter:
    backend = choose_backend(setup)
    model, tokenizer, peft_config = load_for_training(backend, start.path, dtype, spec.lora, setup,
                                                      spec.max_length, seed)
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    fresh_dir(out_dir)
    rows = read_jsonl_rows(data.train)
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    with tempfile.TemporaryDirectory() as scratch:
        args = DPOConfig(**trainer_args(spec, Path(scratch), seed, torch_dtype(dtype)),
                         beta=spec.beta, loss_type=[spec.loss_type])
        # ref_model=None: the reference is the start model (see backends.load_for_training).
        trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=dataset,
                             processing_class=tokenizer, peft_config=peft_config, callbacks=list(callbacks))
        trainer.train()
    trainer.model.save_pretrained(out_dir / "adapter", selected_adapters=["default"])
    metrics = final_metrics(trainer.state.log_history, LOGGED)
    (out_dir / "dpo_metrics.json").write_text(json.dumps(metrics, indent=1))
    (out_dir / "log_history.json").write_text(json.dumps(deterministic_log(trainer.state.log_history), indent=1))
    reference = f"{start.role} model ({start.source}) with the DPO adapter disabled [{backend.name}]"
    return TrainedAdapter(path=str(out_dir / "adapter"), digest=seal(out_dir), start=start,
                          reference=reference, metrics=metrics)


@stage_task
def dpo_task(stage: str, key: str, out_dir: str, start: ModelRef, data: PreparedData, spec: DPOSpec,
             setup: TrainSetup, dtype: str, seed: int) -> TrainedAdapter:
    return train_dpo(start, data, spec, setup, dtype, seed, Path(out_dir))
