"""Whole-stage timings of dpoflow's `dpo` stage on one GPU, for issue #8's two targets:

- one-run: one epoch over --pairs pairs with the GPU defaults (Unsloth, bf16, prompt sharing, the
  reference computed on the fly). Counted: every second of `train_dpo` after the model is loaded (the
  first step's compilation included), and the stage's whole wall time beside it.
- sweep: the `reference` stage's pass once, then four `dpo` stages (beta/lr variants) reusing it, as
  `dpoflow sweep` runs them: the stages one after the other given one `model_reuse.ModelKeeper`, so the
  model is loaded once. Counted: the whole sequence's wall time, the pass and its load included, and
  the same less the one model load.
- sweep-reload: the same, each stage loading its own model (four pipelines run one by one).
- reuse-check: variant A on a fresh load, then variant B and A again on one kept model: A's two
  adapters and logged losses must match.

Tokens are counted as the workload defines them: pairs x 2 x 512 (prompt + answer, both answers),
whatever the stage computes internally. Each scenario runs in a child process that, as the CLI does,
imports torch and dpoflow and freezes them from the collector before Unsloth is imported; one-run and
the stages of a sweep share a `ModelKeeper`, as `dpoflow run` and `dpoflow sweep` run them.
Seconds spent in the garbage collector during a stage are reported as `gc_s`.

    python3 bench/gpu_epoch.py --shape llama-3.1-8b --scenarios one-run,sweep --pairs 512
    # keep the model, data and compile caches in DIR for the next call (a warm machine keeps them):
    python3 bench/gpu_epoch.py --scenarios reuse-check --pairs 64 --keep DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SEQ = 512
VARIANTS = [(0.1, 5e-6), (0.05, 5e-6), (0.1, 1e-5), (0.2, 2.5e-6)]  # (beta, learning rate)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--scenarios", default="one-run,sweep")
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", default=None)
    parser.add_argument("--keep", help="a folder kept after the bench, reused when it has the model and data")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch  # noqa: F401

        import dpoflow.tasks.dpo  # noqa: F401
        from dpoflow.base.runtime import freeze_imports

        freeze_imports()  # as the CLI does once its imports are done (cli.flow_caller)
        run = {"one-run": one_run, "one-run-noshare": one_run, "sweep": sweep, "sweep-reload": sweep,
               "reuse-check": reuse_check}[args.worker]
        result = run(Path(args.work), args.pairs, args.batch, share=not args.worker.endswith("noshare"),
                     **({"keep": False} if args.worker == "sweep-reload" else {}))
        print("RESULT " + json.dumps({"scenario": args.worker, **result}), flush=True)
        return

    from common import report, run_worker, scratch
    from gpu_dpo import build_model, make_pairs

    from dpoflow.engine.models import load_tokenizer

    work = Path(args.keep) if args.keep else scratch()
    work.mkdir(parents=True, exist_ok=True)
    for old in work.iterdir():  # an earlier call's stage outputs: a stage would resume from their checkpoints
        if old.name not in ("model", "cache"):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    if not (work / "model" / "config.json").exists():
        build_model(args.shape, work / "model")
    make_pairs(load_tokenizer(str(work / "model")), args.pairs, SEQ // 2, SEQ // 2, work / "train.jsonl")
    # A fresh compile cache shared by the scenarios: the first runs cold, later ones find its kernels.
    os.environ["DPOFLOW_CACHE_DIR"] = str(work / "cache")
    for scenario in args.scenarios.split(","):
        result, proc = run_worker([__file__, "--worker", scenario, "--work", str(work), "--pairs", str(args.pairs),
                                   "--batch", str(args.batch)])
        result = result or {"scenario": scenario, "error": proc.stderr[-3000:]}
        result.update(shape=args.shape, pairs=args.pairs, batch=args.batch)
        report(result, args.out, prefix="")


def _inputs(work: Path, pairs: int, batch: int, share: bool, beta: float = 0.1, lr: float = 5e-6,
            precompute: bool = False):
    from dpoflow.base.config import DPOSpec, LoraSpec, TrainSetup
    from dpoflow.base.hardware import plan_stage
    from gpu_dpo import bench_records

    setup = TrainSetup()
    # The default effective batch (4 x 8 = 32 pairs): the planner may trade accumulation for a larger micro-batch.
    spec = DPOSpec(per_device_batch_size=batch, gradient_accumulation_steps=8, epochs=1, max_length=SEQ,
                   logging_steps=10, lr_scheduler="constant", lora=LoraSpec(r=16, alpha=16), beta=beta,
                   learning_rate=lr, share_prompt=share, precompute_ref_log_probs=precompute)
    start, data = bench_records(work, "random")
    from dpoflow.engine.backends import choose_backend

    return start, data, spec, setup, plan_stage(setup, spec, start.path, backend=choose_backend(setup).name)


def _train_clock():
    """Wall-clock marks: training begins (model loaded, trainer built), first step ends, training ends."""
    import torch
    from transformers import TrainerCallback

    class Marks(TrainerCallback):
        def __init__(self):
            self.marks: dict[str, float] = {}
            self.steps = 0

        def _now(self):
            torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks["begin"] = self._now()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1
            if self.steps == 1:
                self.marks["first_step"] = self._now()

        def on_train_end(self, args, state, control, **kwargs):
            self.marks["end"] = self._now()

    return Marks()


class _GcClock:
    """Seconds the garbage collector runs, from `gc.callbacks`."""

    def __init__(self):
        self.seconds, self.collections, self._began = 0.0, 0, None

    def __call__(self, phase, info):
        if phase == "start":
            self._began = time.perf_counter()
        elif self._began is not None:
            self.seconds += time.perf_counter() - self._began
            self.collections += 1 if info["generation"] == 2 else 0

    def __enter__(self):
        import gc

        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        import gc

        gc.callbacks.remove(self)


def _train(work, pairs, batch, share, name, **variant):
    import torch

    from dpoflow.tasks.dpo import train_dpo

    start, data, spec, setup, plan, reference = variant.pop("prepared")
    keeper = variant.pop("keeper", None)
    marks = _train_clock()
    torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    with _GcClock() as collector:
        adapter = train_dpo(start, data, spec, setup, plan, 0, work / name, reference=reference,
                            callbacks=(marks,), keeper=keeper)
    done = time.perf_counter()
    m = marks.marks
    tokens = pairs * 2 * SEQ
    micro_batch, accumulation = plan.per_device_batch, plan.gradient_accumulation_steps
    log = json.loads((Path(adapter.path).parent / "log_history.json").read_text())
    losses = [e["loss"] for e in log if "loss" in e]
    metrics = json.loads((Path(adapter.path).parent / "dpo_metrics.json").read_text())
    return {"retries": metrics.get("retries"), "stage_s": round(done - began, 1), "gc_s": round(collector.seconds, 2),
            "full_collections": collector.collections, "load_s": round(m["begin"] - began, 1),
            "after_load_s": round(m["end"] - m["begin"], 1), "first_step_s": round(m["first_step"] - m["begin"], 1),
            "tok_per_s_after_load": round(tokens / (m["end"] - m["begin"])),
            "tok_per_s_steady": round(tokens * (marks.steps - 1) / marks.steps / (m["end"] - m["first_step"])),
            "steps": marks.steps, "micro_batch": micro_batch, "gradient_checkpointing": plan.gradient_checkpointing,
            "accumulation": accumulation, "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "losses": [round(x, 4) for x in losses[:3] + losses[-2:]], "backend": adapter.reference}


def _import_unsloth() -> None:
    """As the stage does (backends.activate), timed apart from the stage."""
    from dpoflow.engine.backends import keep_compile_caches

    keep_compile_caches()
    import unsloth  # noqa: F401


def one_run(work: Path, pairs: int, batch: int, share: bool) -> dict:
    _import_unsloth()
    from dpoflow.engine.model_reuse import ModelKeeper

    inputs = _inputs(work, pairs, batch, share)
    with ModelKeeper() as keeper:
        return _train(work, pairs, batch, share, "one-run", prepared=(*inputs, None), keeper=keeper)


def _timed_loads():
    """Wrap the stage's model load to time it: the sweep's figures with and without the one load."""
    import torch

    import dpoflow.tasks.dpo as stage

    seconds = []
    load = stage.load_for_training

    def timed(*args, **kwargs):
        began = time.perf_counter()
        loaded = load(*args, **kwargs)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - began)
        return loaded

    stage.load_for_training = timed
    return seconds


def sweep(work: Path, pairs: int, batch: int, share: bool, keep: bool = True) -> dict:
    _import_unsloth()
    import contextlib

    import torch

    from dpoflow.engine.model_reuse import ModelKeeper
    from dpoflow.tasks.dpo import compute_reference_logps

    load_seconds = _timed_loads()
    began = time.perf_counter()
    with ModelKeeper() if keep else contextlib.nullcontext() as kept:
        start, data, spec, setup, plan = _inputs(work, pairs, batch, share, precompute=True)
        reference = compute_reference_logps(start, data, spec, setup, plan, 0, work / f"reference-{keep}",
                                            keeper=kept)
        torch.cuda.synchronize()
        pass_s = time.perf_counter() - began
        runs = []
        for beta, lr in VARIANTS:
            inputs = _inputs(work, pairs, batch, share, beta=beta, lr=lr, precompute=True)
            runs.append({"beta": beta, "lr": lr, **_train(work, pairs, batch, share, f"sweep-{keep}-{beta}-{lr}",
                                                          prepared=(*inputs, reference), keeper=kept)})
            runs[-1]["allocated_after_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        loads = {"loads": kept.loads, "reuses": kept.reuses} if keep else None
    total = time.perf_counter() - began
    tokens = len(VARIANTS) * pairs * 2 * SEQ
    loaded = sum(load_seconds[:1])  # the first load; a sweep that loads again pays the others
    return {"reference_pass_s": round(pass_s, 1), "total_s": round(total, 1), "training_model": loads,
            "effective_tok_per_s": round(tokens / total), "first_load_s": round(loaded, 1),
            "effective_tok_per_s_after_load": round(tokens / (total - loaded)),
            "loads_s": [round(x, 1) for x in load_seconds], "runs": runs}


def reuse_check(work: Path, pairs: int, batch: int, share: bool) -> dict:
    """Variant A fresh, then B and A on one kept model: the two A adapters must be the same numbers."""
    _import_unsloth()
    import torch
    from safetensors.torch import load_file

    from dpoflow.engine.model_reuse import ModelKeeper

    def variant(name, beta, lr, keeper=None):
        inputs = _inputs(work, pairs, batch, share, beta=beta, lr=lr)
        result = _train(work, pairs, batch, share, name, prepared=(*inputs, None), keeper=keeper)
        return result, load_file(work / name / "adapter" / "adapter_model.safetensors")

    fresh, fresh_weights = variant("check-fresh", 0.1, 5e-6)
    with ModelKeeper() as kept:
        other, _ = variant("check-other", 0.2, 2.5e-6, kept)
        reused, reused_weights = variant("check-reused", 0.1, 5e-6, kept)
        loads = {"loads": kept.loads, "reuses": kept.reuses}
    diff = max((fresh_weights[k].float() - reused_weights[k].float()).abs().max().item() for k in fresh_weights)
    scale = max(fresh_weights[k].float().abs().max().item() for k in fresh_weights)
    return {"training_model": loads, "max_abs_weight_diff": diff, "max_abs_weight": scale,
            "losses_fresh": fresh["losses"], "losses_reused": reused["losses"], "losses_other": other["losses"],
            "load_s": [fresh["load_s"], other["load_s"], reused["load_s"]],
            "peak_alloc_gib": [fresh["peak_alloc_gib"], other["peak_alloc_gib"], reused["peak_alloc_gib"]],
            "allocated_after_gib": round(torch.cuda.memory_allocated() / 2**30, 2)}


if __name__ == "__main__":
    main()
