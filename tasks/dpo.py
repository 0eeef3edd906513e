"""dpo: the preference stage. A fresh LoRA adapter trained with the objective `dpo.method` names
(dpoflow.engine.objectives): TRL's DPOTrainer with `ref_model=None`, so the reference log-probs come from the
same weights with the adapter switched off, the start model (SFT-merged, or the base); or a
reference-free objective (ORPO, SimPO), which has no reference pass at all; or KTO on unpaired examples
(the prepared unpaired rows, and each pair split into a desirable and an undesirable one), against the
start model as DPO. The same adapter and outputs either way, so the stages after it do not care which.

Guards: a non-finite loss, gradient or log-prob stops the stage (checkpoints are kept); a collapse
(chosen log-probs falling far below where they started) is retried from the last good checkpoint
with the learning rate halved, a bounded number of times. Checkpoints are saved every
`guards.checkpoint_steps` steps and sealed (manifest last), the newest `guards.keep_checkpoints` kept;
a stage killed or interrupted mid-way resumes from the newest intact one when re-run.

Optionally the reference pass runs once as its own cached task (`reference_task`), so runs that
differ only in beta, learning rate or loss reuse it.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

from dpoflow.base.artifacts import (MANIFEST, fresh_dir, is_intact, read_jsonl_rows, read_rows, seal, write_atomically,
                               write_jsonl)
from dpoflow.engine.backends import BackendChoice, choose_backend, load_for_training
from dpoflow.base.config import DPOSpec, TrainSetup
from dpoflow.engine.distributed import run_stage
from dpoflow.base.errors import Explained
from dpoflow.base.hardware import TrainingPlan
from dpoflow.engine.model_reuse import ModelKeeper, free_accelerator_memory, training_model
from dpoflow.engine.objectives import EXTRA_LOGGED, objective_args, reference_text, trainer_classes
from dpoflow.engine.pairs import DataError
from dpoflow.engine.prompt_sharing import install as share_prompts
from dpoflow.base.ranks import is_main_process
from dpoflow.base.records import ModelRef, PreparedData, ReferenceLogps, TrainedAdapter
from dpoflow.base.runtime import StageInterrupted
from dpoflow.engine.tracking import TrackerRef
from dpoflow.engine.training import (deterministic_log, final_metrics, keep_outputs_fp32, save_adapter, time_split,
                              trainer_args)
from dpoflow.engine.unpaired import unpair

from . import curve_callbacks, stage_logger, stage_task, training_backend

LOGGED = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
          "logps/chosen", "logps/rejected")
WATCHED = ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/margins")
STATE = "attempt.json"


class NonFiniteLoss(RuntimeError, Explained):
    pass


class CollapseError(RuntimeError, Explained):
    pass


class _Collapsed(Exception):
    def __init__(self, step: int, drop: float):
        self.step, self.drop = step, drop


def _guard_callback(limit_per_token: float, patience: int, tokens_per_completion: float, checkpoints: Path):
    from transformers import TrainerCallback

    class TrainingGuard(TrainerCallback):
        """Watches every log line: non-finite numbers stop training, a collapse asks for a retry."""

        first_chosen: float | None = None
        strikes = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            bad = [k for k in WATCHED if k in logs and not math.isfinite(logs[k])]
            if bad:
                raise NonFiniteLoss(
                    f"dpo: {', '.join(bad)} became non-finite at step {state.global_step}; training stopped. "
                    f"Last good checkpoint: {_latest_checkpoint(checkpoints) or 'none yet'} (kept). Lower "
                    f"dpo.learning_rate, or use bf16 rather than fp16.")
            chosen = logs.get("logps/chosen")
            if chosen is None:
                return
            if self.first_chosen is None:
                self.first_chosen = chosen
            drop = (self.first_chosen - chosen) / tokens_per_completion
            self.strikes = self.strikes + 1 if drop > limit_per_token else 0
            if self.strikes >= patience:
                raise _Collapsed(state.global_step - (self.strikes - 1) * args.logging_steps, drop)

    return TrainingGuard()


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Sealed checkpoints, oldest first. The manifest is written after every file of the checkpoint
    (see _checkpoint_keeper), so one cut short by a kill mid-save is never listed."""
    found = folder.glob(f"checkpoint-*/{MANIFEST}") if folder.exists() else []
    return sorted((int(p.parent.name.split("-")[1]), p.parent) for p in found)


def _latest_checkpoint(folder: Path) -> Path | None:
    found = _checkpoints(folder)
    return found[-1][1] if found else None


def _resume_point(folder: Path, log) -> Path | None:
    """The newest checkpoint whose files still match their manifest. A damaged one (a file cut short
    or altered on disk) would fail every re-run: it is skipped with a warning, and overwritten when
    training reaches its step again."""
    found = [path for _, path in _checkpoints(folder)]
    damaged = []
    while found and not is_intact(found[-1]):
        damaged.append(found.pop())
    if damaged and is_main_process():
        log(f"WARNING: dpo: checkpoint {', '.join(map(str, damaged))} is damaged (its files differ from its "
            f"manifest); resuming from {found[-1].name if found else 'the start'} instead")
    return found[-1] if found else None


def _checkpoint_keeper(keep: int, guard):
    """Seals each checkpoint once the Trainer has written all of it, then removes all but the newest
    `keep` (and leftovers of a save cut short). While the guard counts collapse strikes nothing is
    removed: a retry restarts from the last checkpoint before the collapse began."""
    from transformers import TrainerCallback

    class CheckpointKeeper(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            folder = Path(args.output_dir)
            seal(folder / f"checkpoint-{state.global_step}")
            if not guard.strikes:
                _prune_checkpoints(folder, keep)

    return CheckpointKeeper()


def _prune_checkpoints(folder: Path, keep: int) -> None:
    """Removes all but the newest `keep` sealed checkpoints, and leftovers of a save cut short."""
    kept = {path for _, path in _checkpoints(folder)[-keep:]}
    for old in folder.glob("checkpoint-*"):
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)


def _checkpoint_before(folder: Path, step: int) -> tuple[int, Path | None]:
    """(step, folder) of the newest complete checkpoint older than `step`; (0, None) if there is none."""
    good = [(s, path) for s, path in _checkpoints(folder) if s < step]
    return good[-1] if good else (0, None)


def _retry_after(collapse: _Collapsed, state: dict, attempt_dir: Path, total_steps: int, guards) -> dict:
    """The next attempt's state: from the last good checkpoint, with the learning rate halved; or a
    CollapseError once the retries are spent."""
    done, good = _checkpoint_before(attempt_dir, collapse.step)
    record = {"attempt": state["attempt"], "step": collapse.step, "drop_per_token": round(collapse.drop, 3),
              "learning_rate": state["learning_rate"], "restart_from": str(good) if good else "start"}
    if state["attempt"] >= guards.max_retries:
        raise CollapseError(
            f"dpo: collapse at step {collapse.step} (chosen log-prob {collapse.drop:.2f} nats/token below start) "
            f"after {state['attempt']} retries with the learning rate halved each time; last attempt lr "
            f"{state['learning_rate']:g}. Checkpoints kept in {attempt_dir.parent}.")
    return {"attempt": state["attempt"] + 1, "learning_rate": state["learning_rate"] / 2,
            "init_from": str(good) if good else state["init_from"],
            "max_steps": max(total_steps - done, 1), "retries": state["retries"] + [record]}


TOKENIZED = ("prompt_ids", "chosen_ids", "rejected_ids")
PAIRS_FILE = "train_pairs.arrow"


def _kto_rows(data: PreparedData, seed: int):
    """KTO's training examples: the unpaired ones, and each pair as a desirable and an undesirable one,
    shuffled (seeded). TRL's KTO reads them in order (it estimates the KL term from each micro-batch's
    neighbours), so without the shuffle a micro-batch would hold one prompt's two answers, or one label only."""
    from datasets import Dataset

    rows = unpair(read_rows(data.train)) + (read_rows(data.train_unpaired) if data.train_unpaired else [])
    rows = [{"prompt": r["prompt"], "completion": r["completion"], "label": bool(r["label"])} for r in rows]
    random.Random(seed).shuffle(rows)
    return Dataset.from_list(rows)


def _pairs_needed(data: PreparedData, spec: DPOSpec, log) -> None:
    """Every method but KTO trains on pairs: with none, one line says what the data holds instead; unpaired
    examples beside pairs are left out, and said so."""
    unpaired = data.counts.get("train_unpaired", 0)
    if not unpaired or not is_main_process():
        return
    if data.counts.get("train", 0) == unpaired:
        raise DataError(f"dpo.method {spec.method} trains on preference pairs, and the prepared data has none: its "
                        f"{unpaired} train examples are unpaired (prompt/completion/label). Set dpo.method: kto, or "
                        "give pairs (prompt/chosen/rejected)")
    log(f"dpo: {unpaired} unpaired train examples left out: dpo.method {spec.method} trains on pairs only "
        "(dpo.method kto trains on both)")


def _train_rows(data: PreparedData, reference: ReferenceLogps | None):
    from datasets import Dataset

    if reference is not None and reference.pairs:
        # Tokenized by the reference pass with this start model's tokenizer and this max_length (both
        # in that pass's cache key): the very token ids its log-probs were computed from.
        return Dataset.from_file(reference.pairs)
    rows = [{"row": i, **{k: r[k] for k in ("prompt", "chosen", "rejected")}}
            for i, r in enumerate(read_rows(data.train))]
    if reference is not None:
        ref = {r["row"]: r for r in read_jsonl_rows(reference.file)}
        # Rows TRL drops as fully truncated have no reference value; TRL drops them again here.
        for r in rows:
            r["ref_chosen_logps"] = ref.get(r["row"], {}).get("ref_chosen_logps", 0.0)
            r["ref_rejected_logps"] = ref.get(r["row"], {}).get("ref_rejected_logps", 0.0)
    return Dataset.from_list(rows)


def _write_pairs(path: Path, dataset, chosen: list[float], rejected: list[float]) -> None:
    """TRL's tokenized rows and their reference log-probs as one Arrow file (`Dataset.from_file` reads it)."""
    import pyarrow as pa

    table = dataset.select_columns(["row", *TOKENIZED]).flatten_indices().data.table
    # int32 token ids: half the bytes of int64 on disk, and TRL's collator makes the same int64 tensors.
    table = table.cast(pa.schema([pa.field(f.name, pa.list_(pa.int32())) if f.name in TOKENIZED else f
                                  for f in table.schema]))
    table = table.append_column("ref_chosen_logps", pa.array(chosen, pa.float64()))
    table = table.append_column("ref_rejected_logps", pa.array(rejected, pa.float64()))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _trainer_class(method: str):
    """TRL's trainer for `method` (Unsloth's, once Unsloth is imported: looked up only now), resuming
    the trained adapter from a checkpoint; DPO's also takes rows already tokenized as they are."""
    trainer_class, _ = trainer_classes(method)

    class ResumableTrainer(trainer_class):
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            # A DPO checkpoint holds the trained adapter at its root and TRL's frozen "ref" copy in ref/.
            # transformers loads only the subfolders when any exist, so a resume would go on training
            # the fresh adapter: load the trained one here (the "ref" copy is the start model anyway).
            # KTO's checkpoints are laid out the same way; reference-free trainers have no "ref" copy, and
            # the same load serves them.
            if self.is_fsdp_enabled or not (Path(resume_from_checkpoint) / ADAPTER_FILE).is_file():
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            _load_adapter_weights(model or self.model, Path(resume_from_checkpoint))

    if method != "dpo":
        return ResumableTrainer  # ORPO, CPO and KTO tokenize the text themselves

    class PretokenizedDPOTrainer(ResumableTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if set(TOKENIZED) <= set(dataset.column_names):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return PretokenizedDPOTrainer


def _trainer(backend: BackendChoice, start: ModelRef, dataset, spec: DPOSpec, plan: TrainingPlan, seed: int,
             output_dir: Path, learning_rate: float, max_steps: int, callbacks: list, keeper: ModelKeeper | None):
    # The same weights, LoRA and length load the same model: with the flow's `keeper` the
    # reference pass and each sweep variant take the one already loaded, reset.
    key = (backend.name, start.path, start.digest, plan.precision, plan.load_in_4bit, plan.gradient_checkpointing,
           spec.lora.model_dump_json(), spec.max_length, seed)
    model, tokenizer, peft_config = training_model(
        keeper, key, lambda: load_for_training(backend, start.path, plan, spec.lora, spec.max_length, seed),
        stage_logger())
    _, config_class = trainer_classes(spec.method)
    args = trainer_args(spec, output_dir, seed, plan)
    args.update(learning_rate=learning_rate, max_steps=max_steps, save_strategy="steps",
                save_steps=spec.guards.checkpoint_steps)
    if spec.reference_free:
        args["remove_unused_columns"] = False  # their collator reads the text columns; TRL sets it with a warning
    config = config_class(**args, **objective_args(spec))
    # DPO: ref_model=None, the reference is the start model (see backends.load_for_training). The
    # reference-free trainers take no reference argument at all.
    reference = {} if spec.reference_free else {"ref_model": None}
    trainer = _trainer_class(spec.method)(model=model, **reference, args=config, train_dataset=dataset,
                                          processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    keep_outputs_fp32(trainer)
    if spec.share_prompt and spec.method == "dpo":  # it lays out DPOTrainer's batches; ORPO and CPO keep theirs
        stage_logger()(share_prompts(trainer, backend.name))
    return trainer


ADAPTER_FILE = "adapter_model.safetensors"


def _load_adapter_weights(model, checkpoint: Path) -> None:
    """A checkpoint's adapter weights into the trained ("default") adapter only, so the reference
    (adapter off, or the frozen "ref" copy) stays the start model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(checkpoint / ADAPTER_FILE)
    result = set_peft_model_state_dict(model, weights, adapter_name="default")
    if result.unexpected_keys:  # names that matched no parameter: those weights were not loaded
        raise RuntimeError(f"dpo: {checkpoint} holds adapter weights this model does not have: "
                           f"{result.unexpected_keys[:3]}")


def train_dpo(start: ModelRef, data: PreparedData, spec: DPOSpec, setup: TrainSetup, plan: TrainingPlan, seed: int,
              out_dir: Path, checkpoint_dir: Path | None = None, reference: ReferenceLogps | None = None,
              callbacks: tuple = (), keeper: ModelKeeper | None = None,
              tracker: TrackerRef | None = None) -> TrainedAdapter | None:
    """Train the DPO adapter into `out_dir`. Under torchrun every rank calls this; the main process
    writes the outputs and returns the record, the others return None. `keeper`: the flow's keeper of a
    loaded training model, to take the model from (model_reuse); None: load one and free it after.
    `tracker`: the tracked run the curve is sent to as it is logged."""
    began = time.perf_counter()
    backend = choose_backend(setup)
    if spec.method == "kto":
        if plan.per_device_batch < 2:  # the hardware plan may halve the configured batch to fit memory
            raise DataError(f"kto estimates its KL term from the other examples of a micro-batch, and the "
                            f"hardware plan left {plan.per_device_batch}; give more GPU memory or a shorter "
                            "dpo.max_length")
        dataset = _kto_rows(data, seed)
    else:
        _pairs_needed(data, spec, stage_logger())
        dataset = _train_rows(data, reference)
    # Beside out_dir rather than in a per-process temp folder: all ranks must see the same checkpoints.
    checkpoint_dir = checkpoint_dir or out_dir.with_name(out_dir.name + "-checkpoints")
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    state_file = checkpoint_dir / STATE
    # What attempt we are in survives a killed process, so a re-run resumes that attempt.
    state = json.loads(state_file.read_text()) if state_file.exists() else {
        "attempt": 0, "learning_rate": spec.learning_rate, "init_from": None, "max_steps": spec.max_steps,
        "retries": []}
    while True:
        attempt_dir = checkpoint_dir / f"attempt-{state['attempt']}"
        if is_main_process():
            write_atomically(state_file, json.dumps(state, indent=1))
        trainer = _trainer(backend, start, dataset, spec, plan, seed, attempt_dir, state["learning_rate"],
                           state["max_steps"], [*callbacks, *curve_callbacks(tracker, "dpo")], keeper)
        if reference is not None:
            trainer.precompute_ref_logps = True  # use the dataset's ref_* columns (TRL's own switch)
        tokens = _tokens_per_completion(trainer, spec)
        guard = _guard_callback(spec.guards.max_chosen_logp_drop_per_token, spec.guards.collapse_patience, tokens,
                                attempt_dir)
        trainer.add_callback(guard)
        trainer.add_callback(_checkpoint_keeper(spec.guards.keep_checkpoints, guard))
        trainer.add_callback(time_split("dpo", began, stage_logger()))
        resume = _resume_point(attempt_dir, stage_logger())
        if resume is not None:
            if is_main_process():
                stage_logger()(f"dpo: resuming from {resume} (step {resume.name.split('-')[1]})")
        elif state["init_from"]:
            _load_adapter_weights(trainer.model, Path(state["init_from"]))
        try:
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            break
        except KeyboardInterrupt:
            if is_main_process() and not guard.strikes:  # Ctrl-C can land between a seal and its pruning
                _prune_checkpoints(attempt_dir, spec.guards.keep_checkpoints)
            kept = _latest_checkpoint(attempt_dir)
            raise StageInterrupted(f"dpo at step {trainer.state.global_step}; "
                                   + (f"checkpoint kept: {kept}" if kept else "no checkpoint yet")) from None
        except _Collapsed as collapse:
            state = _retry_after(collapse, state, attempt_dir, trainer.state.max_steps, spec.guards)
            del trainer
            free_accelerator_memory()

    if is_main_process():
        fresh_dir(out_dir)
    save_adapter(trainer, out_dir / "adapter")
    log = deterministic_log(trainer.state.log_history)
    # Forward calls of this attempt (policy, and the reference when on the fly) through the shared
    # layout or TRL's own; a fallback count above zero says the data had pairs it could not share.
    sharing = dict(getattr(trainer, "prompt_sharing", {}))
    fallbacks = sharing.pop("fallbacks", {})
    if sharing:
        sharing["fallback_batches"] = sum(fallbacks.values())
    if fallbacks:
        stage_logger()(f"prompt sharing fell back to TRL's layout: {fallbacks}")
    # The trainer, its model and optimizer hold each other in reference cycles; free them now, not at
    # some later collection, or the next stage in this process (another variant, the evaluation) loads
    # its model beside this one (measured: peak 16.6 -> 30.5 GiB at the 8B shape).
    del trainer
    free_accelerator_memory()
    if not is_main_process():
        return None
    metrics = final_metrics(log, LOGGED + EXTRA_LOGGED.get(spec.method, ()))
    metrics["retries"] = float(len(state["retries"]))
    metrics["final_learning_rate"] = state["learning_rate"]
    if spec.method == "kto":  # what it trained on, pairs split: the summary's desirable/undesirable counts
        liked = sum(dataset["label"])
        metrics.update({"kto/desirable": float(liked), "kto/undesirable": float(len(dataset) - liked)})
    metrics.update({f"prompt_sharing/{k}": float(v) for k, v in sharing.items()})
    (out_dir / "dpo_metrics.json").write_text(json.dumps(metrics, indent=1))
    (out_dir / "log_history.json").write_text(json.dumps(log, indent=1))
    (out_dir / "retries.json").write_text(json.dumps(state["retries"], indent=1))
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    how = "precomputed once from" if reference is not None else "computed on the fly from"
    ref_text = reference_text(spec, f"{start.role} model ({start.source})",
                              f"with the DPO adapter disabled [{backend.name}; {how} it]")
    return TrainedAdapter(path=str(out_dir / "adapter"), digest=seal(out_dir), start=start, reference=ref_text,
                          metrics=metrics, retries=state["retries"])


def _tokens_per_completion(trainer, spec: DPOSpec) -> float:
    """The mean completion length, in tokens, the collapse guard divides the chosen log-prob by (KTO's
    "chosen": its desirable examples). ORPO and SimPO log the per-token mean log-prob already: 1."""
    if spec.reference_free:
        return 1.0
    if spec.method == "kto":
        dataset = trainer.train_dataset
        liked = [len(ids) for ids, label in zip(dataset["completion_ids"], dataset["label"]) if label]
        return sum(liked) / max(len(liked), 1) or 1.0
    return sum(len(ids) for ids in trainer.train_dataset["chosen_ids"]) / len(trainer.train_dataset)


def compute_reference_logps(start: ModelRef, data: PreparedData, spec: DPOSpec, setup: TrainSetup,
                            plan: TrainingPlan, seed: int, out_dir: Path,
                            keeper: ModelKeeper | None = None) -> ReferenceLogps:
    """The start model's log-probs of every train pair, computed by TRL itself (same tokenization,
    truncation and masking as training), stored per row. `keeper`: as for `train_dpo`."""
    import torch
    from torch.utils.data import DataLoader

    backend = choose_backend(setup)
    fresh_dir(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = _trainer(backend, start, _train_rows(data, None), spec, plan, seed, Path(scratch),
                           spec.learning_rate, 1, [], keeper)
        dataset = trainer.train_dataset
        loader = trainer.accelerator.prepare(DataLoader(
            dataset.select_columns(list(TOKENIZED)), batch_size=plan.per_device_batch,
            collate_fn=trainer.data_collator, shuffle=False))
        chosen, rejected = [], []
        # Train mode, as in training (dropout is 0 there too): under Unsloth, eval() switches to other
        # kernels, and the stored values then differ from what training computes (docs/benchmarks.md).
        with torch.no_grad():
            for batch in loader:
                c, r = trainer.compute_ref_log_probs(trainer.model, batch)
                chosen += c.float().cpu().tolist()
                rejected += r.float().cpu().tolist()
        del trainer, loader
        free_accelerator_memory()  # unless `keeper` keeps the model, the dpo stage loads its own next
    file = out_dir / "reference_logps.jsonl"
    write_jsonl(file, [{"row": row, "ref_chosen_logps": c, "ref_rejected_logps": r}
                       for row, c, r in zip(dataset["row"], chosen, rejected)])
    _write_pairs(out_dir / PAIRS_FILE, dataset, chosen, rejected)
    return ReferenceLogps(path=str(out_dir), digest=seal(out_dir), file=str(file), start=start,
                          pairs=str(out_dir / PAIRS_FILE))


def reference_spec(spec: DPOSpec) -> DPOSpec:
    """The part of a DPO spec the reference pass depends on, the rest at its defaults: what the reference
    task is given, so runs that differ only in beta, learning rate, loss or steps share one pass. The
    LoRA and gradient checkpointing settings load the model as the dpo stage does, which lets both use
    one load (model_reuse)."""
    return DPOSpec(max_length=spec.max_length, share_prompt=spec.share_prompt, lora=spec.lora,
                   gradient_checkpointing=spec.gradient_checkpointing)


@stage_task(depends_on=training_backend)
def reference_task(out_dir: str, start: ModelRef, data: PreparedData, spec: DPOSpec,
                   setup: TrainSetup, plan: TrainingPlan, seed: int,
                   keeper: ModelKeeper | None = None) -> ReferenceLogps:
    return compute_reference_logps(start, data, spec, setup, plan, seed, Path(out_dir), keeper)


@stage_task(depends_on=training_backend)
def dpo_task(out_dir: str, checkpoint_dir: str, start: ModelRef, data: PreparedData,
             spec: DPOSpec, setup: TrainSetup, plan: TrainingPlan, seed: int,
             reference: ReferenceLogps | None = None, keeper: ModelKeeper | None = None,
             tracker: TrackerRef | None = None) -> TrainedAdapter:
    return run_stage(train_dpo, plan.num_processes, stage_logger(), start=start, data=data, spec=spec, setup=setup,
                     plan=plan, seed=seed, out_dir=Path(out_dir), checkpoint_dir=Path(checkpoint_dir),
                     reference=reference, keeper=keeper, tracker=tracker)
