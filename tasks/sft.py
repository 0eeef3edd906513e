"""sft (optional): LoRA supervised fine-tuning on the chosen responses (and the desirable completions of
unpaired data), then the adapter is merged so DPO starts from (and uses as its reference) the SFT model
itself."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from dpoflow.base.artifacts import fresh_dir, read_rows, seal
from dpoflow.engine.backends import BackendError, choose_backend, load_for_training
from dpoflow.base.config import SFTSpec, TrainSetup
from dpoflow.engine.distributed import run_stage
from dpoflow.base.hardware import TrainingPlan
from dpoflow.engine.model_reuse import ModelKeeper
from dpoflow.engine.models import load_model
from dpoflow.base.ranks import is_main_process
from dpoflow.base.records import ModelRef, PreparedData
from dpoflow.engine.tracking import TrackerRef
from dpoflow.engine.training import (deterministic_log, final_metrics, keep_outputs_fp32, save_adapter, time_split,
                              trainer_args)

from . import curve_callbacks, stage_logger, stage_task, training_backend


def train_sft(base: ModelRef, data: PreparedData, spec: SFTSpec, setup: TrainSetup, plan: TrainingPlan, seed: int,
              out_dir: Path, keeper: ModelKeeper | None = None,
              tracker: TrackerRef | None = None) -> ModelRef | None:
    """Train, merge and save the SFT model into `out_dir`. Under torchrun every rank calls this; the
    main process writes the model and returns the record, the others return None. `keeper`: the flow's
    keeper of a loaded training model, whose model (a sweep's earlier DPO stage's) is freed first.
    `tracker`: the tracked run the curve is sent to as it is logged."""
    began = time.perf_counter()
    if plan.load_in_4bit or plan.precision == "fp8":
        raise BackendError("sft: merging an adapter into 4-bit/FP8 weights is not supported; "
                           "set train.quantize: none and train.precision: bf16 for SFT, or sft.enabled: false")
    backend = choose_backend(setup)
    if keeper is not None:
        keeper.release()  # never two training models at once
    model, tokenizer, peft_config = load_for_training(backend, base.path, plan, spec.lora, spec.max_length, seed)
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_list(sft_rows(data))
    scratch = out_dir.with_name(out_dir.name + "-scratch")  # one folder every rank sees
    args = SFTConfig(**trainer_args(spec, scratch, seed, plan), completion_only_loss=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=curve_callbacks(tracker, "sft"))
    trainer.add_callback(time_split("sft", began, stage_logger()))
    keep_outputs_fp32(trainer)
    trainer.train()
    if trainer.is_fsdp_enabled:
        # The in-memory weights are shards: gather the adapter, then merge it into a fresh full copy.
        save_adapter(trainer, scratch / "adapter")
        if not is_main_process():
            return None
        from peft import PeftModel

        trainer.model = PeftModel.from_pretrained(load_model(base.path, str(model.dtype).removeprefix("torch.")),
                                                  scratch / "adapter")
    if not is_main_process():
        return None
    fresh_dir(out_dir)
    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    shutil.rmtree(scratch, ignore_errors=True)
    log = deterministic_log(trainer.state.log_history)
    metrics = final_metrics(log, ("loss", "mean_token_accuracy"))
    (out_dir / "sft_metrics.json").write_text(json.dumps(metrics, indent=1))
    # The curve as trained: a tracked run that finds this stage cached sends it from here.
    (out_dir / "log_history.json").write_text(json.dumps(log, indent=1))
    return ModelRef(path=str(out_dir), digest=seal(out_dir), source=f"sft of {base.source}", role="sft")


def sft_rows(data: PreparedData) -> list[dict]:
    """The answers to imitate: each pair's chosen one, and each unpaired example labelled desirable (a
    thumbs-down answer is never imitated)."""
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in read_rows(data.train)]
    if data.train_unpaired:
        rows += [{"prompt": r["prompt"], "completion": r["completion"]} for r in read_rows(data.train_unpaired)
                 if r["label"]]
    return rows


@stage_task(depends_on=training_backend)
def sft_task(out_dir: str, base: ModelRef, data: PreparedData, spec: SFTSpec,
             setup: TrainSetup, plan: TrainingPlan, seed: int, keeper: ModelKeeper | None = None,
             tracker: TrackerRef | None = None) -> ModelRef:
    return run_stage(train_sft, plan.num_processes, stage_logger(), base=base, data=data, spec=spec, setup=setup,
                     plan=plan, seed=seed, out_dir=Path(out_dir), keeper=keeper, tracker=tracker)
