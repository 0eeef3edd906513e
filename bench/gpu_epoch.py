"""Whole-stage timings of dpoflow's `dpo` stage on one GPU, for issue #8's two targets:

- one-run: one epoch over --pairs pairs with the GPU defaults (Unsloth, bf16, prompt sharing, the
  reference computed on the fly). Counted: every second of `train_dpo` after the model is loaded (the
  first step's compilation included), and the stage's whole wall time beside it.
- sweep: the `reference` stage's pass once, then four `dpo` stages (beta/lr variants) reusing it, as
  four pipelines that differ only in beta or lr do through the cache. Counted: the whole sequence's
  wall time, pass and the four model loads included; also without the loads.

Tokens are counted as the workload defines them: pairs x 2 x 512 (prompt + answer, both answers),
whatever the stage computes internally.

    python3 bench/gpu_epoch.py --shape llama-3.1-8b --scenarios one-run,sweep --pairs 512
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
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
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run = {"one-run": one_run, "one-run-noshare": one_run, "sweep": sweep}[args.worker]
        result = run(Path(args.work), args.pairs, args.batch, share=not args.worker.endswith("noshare"))
        print("RESULT " + json.dumps({"scenario": args.worker, **result}), flush=True)
        return

    from common import report, run_worker
    from gpu_dpo import build_model, make_pairs

    from dpoflow.models import load_tokenizer

    work = Path(tempfile.mkdtemp())
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
    from dpoflow.config import DPOSpec, LoraSpec, TrainSetup
    from dpoflow.hardware import plan_stage
    from gpu_dpo import bench_records

    setup = TrainSetup()
    # The default effective batch (4 x 8 = 32 pairs): the planner may trade accumulation for a larger micro-batch.
    spec = DPOSpec(per_device_batch_size=batch, gradient_accumulation_steps=8, epochs=1, max_length=SEQ,
                   logging_steps=10, lr_scheduler="constant", lora=LoraSpec(r=16, alpha=16), beta=beta,
                   learning_rate=lr, share_prompt=share, precompute_ref_log_probs=precompute)
    start, data = bench_records(work, "random")
    return start, data, spec, setup, plan_stage(setup, spec, start.path)


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


def _train(work, pairs, batch, share, name, **variant):
    import torch

    from dpoflow.tasks.dpo import train_dpo

    start, data, spec, setup, plan, reference = variant.pop("prepared")
    marks = _train_clock()
    torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    adapter = train_dpo(start, data, spec, setup, plan, 0, work / name, reference=reference, callbacks=(marks,))
    done = time.perf_counter()
    m = marks.marks
    tokens = pairs * 2 * SEQ
    micro_batch, accumulation = plan.per_device_batch, plan.gradient_accumulation_steps
    log = json.loads((Path(adapter.path).parent / "log_history.json").read_text())
    losses = [e["loss"] for e in log if "loss" in e]
    metrics = json.loads((Path(adapter.path).parent / "dpo_metrics.json").read_text())
    return {"retries": metrics.get("retries"), "stage_s": round(done - began, 1), "load_s": round(m["begin"] - began, 1),
            "after_load_s": round(m["end"] - m["begin"], 1), "first_step_s": round(m["first_step"] - m["begin"], 1),
            "tok_per_s_after_load": round(tokens / (m["end"] - m["begin"])),
            "tok_per_s_steady": round(tokens * (marks.steps - 1) / marks.steps / (m["end"] - m["first_step"])),
            "steps": marks.steps, "micro_batch": micro_batch,
            "accumulation": accumulation, "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "losses": [round(x, 4) for x in losses[:3] + losses[-2:]], "backend": adapter.reference}


def _import_unsloth() -> None:
    """As the stage does (backends.activate), timed apart from the stage."""
    from dpoflow.backends import keep_compile_caches

    keep_compile_caches()
    import unsloth  # noqa: F401


def one_run(work: Path, pairs: int, batch: int, share: bool) -> dict:
    _import_unsloth()

    inputs = _inputs(work, pairs, batch, share)
    return _train(work, pairs, batch, share, "one-run", prepared=(*inputs, None))


def sweep(work: Path, pairs: int, batch: int, share: bool) -> dict:
    _import_unsloth()
    import torch

    from dpoflow.tasks.dpo import compute_reference_logps

    began = time.perf_counter()
    start, data, spec, setup, plan = _inputs(work, pairs, batch, share, precompute=True)
    reference = compute_reference_logps(start, data, spec, setup, plan, 0, work / "reference")
    torch.cuda.synchronize()
    pass_s = time.perf_counter() - began
    runs = []
    for beta, lr in VARIANTS:
        inputs = _inputs(work, pairs, batch, share, beta=beta, lr=lr, precompute=True)
        runs.append({"beta": beta, "lr": lr,
                     **_train(work, pairs, batch, share, f"sweep-{beta}-{lr}", prepared=(*inputs, reference))})
    total = time.perf_counter() - began
    tokens = len(VARIANTS) * pairs * 2 * SEQ
    loads = sum(r["load_s"] for r in runs)
    return {"reference_pass_s": round(pass_s, 1), "total_s": round(total, 1),
            "effective_tok_per_s": round(tokens / total),
            "effective_tok_per_s_without_loads": round(tokens / (total - loads)), "runs": runs}


if __name__ == "__main__":
    main()
