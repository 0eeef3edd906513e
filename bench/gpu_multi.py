"""Data-parallel DPO on several GPUs vs one: dpoflow's `dpo` stage (tasks/dpo.train_dpo, TRL + PEFT,
`ref_model=None`) launched through torchrun by `dpoflow.engine.distributed.launch`, exactly as the pipeline
launches it. Random-weight Llama shape, 8 pairs x 2 x 512 tokens per optimizer step (the effective
batch) whatever the process count: 1 process accumulates 2 micro-batches of 4 pairs, 2 processes
take one each. Prints one JSON line per run: tokens/s over the steady steps, peak GPU memory of
rank 0, the logged losses (which must agree across process counts within bf16 noise).

    python3 bench/gpu_multi.py --shape llama-3.1-8b --runs ddp:1,ddp:2,fsdp:2 [--steps 12]

Scaling efficiency = tok/s on N GPUs / (N x tok/s on 1 GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import report  # noqa: E402
from gpu_dpo import bench_records, build_model, make_pairs  # noqa: E402

PAIRS_PER_DEVICE, EFFECTIVE_PAIRS, SEQ = 4, 8, 512


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--runs", default="ddp:1,ddp:2", help="strategy:processes, comma separated")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of tokens/s")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file too")
    parser.add_argument("--sft-runs", default="", help="also run the sft stage (train + merge) this way")
    args = parser.parse_args()

    import torch

    from dpoflow.base.config import DistributedSpec, DPOSpec, LoraSpec, SFTSpec, TrainSetup
    from dpoflow.engine.distributed import launch
    from dpoflow.base.hardware import plan_stage
    from dpoflow.engine.models import load_tokenizer
    from dpoflow.tasks.dpo import train_dpo
    from dpoflow.tasks.sft import train_sft

    from common import scratch

    work = scratch()
    began = time.perf_counter()
    build_model(args.shape, work / "model")
    tok = load_tokenizer(str(work / "model"))
    make_pairs(tok, EFFECTIVE_PAIRS * args.steps, SEQ // 2, SEQ // 2, work / "train.jsonl")
    print(f"model + data built in {time.perf_counter() - began:.0f} s", flush=True)
    start, data = bench_records(work, f"random {args.shape}")
    spec = DPOSpec(learning_rate=5e-6, beta=0.1, per_device_batch_size=PAIRS_PER_DEVICE,
                   gradient_accumulation_steps=EFFECTIVE_PAIRS // PAIRS_PER_DEVICE, max_steps=args.steps,
                   max_length=SEQ, logging_steps=1, lr_scheduler="constant", lora=LoraSpec(r=16, alpha=16))
    tokens_per_step = EFFECTIVE_PAIRS * 2 * SEQ
    for run in args.runs.split(","):
        strategy, processes = run.split(":")
        setup = TrainSetup(backend="trl", precision="bf16", quantize="none",
                           distributed=DistributedSpec(num_processes=int(processes), strategy=strategy))
        result = {"run": run, "shape": args.shape, "gpu": torch.cuda.get_device_name(), "gpus": int(processes)}
        clock = work / f"clock-{strategy}-{processes}.json"
        out_dir = work / f"out-{strategy}-{processes}"
        began = time.perf_counter()
        try:
            plan = plan_stage(setup, spec, start.path)
            result["plan"] = {"per_device_batch": plan.per_device_batch,
                              "gradient_accumulation_steps": plan.gradient_accumulation_steps}
            launch(train_dpo, dict(start=start, data=data, spec=spec, setup=setup, plan=plan, seed=0,
                                   out_dir=out_dir), int(processes), lambda line: None, step_times=clock)
            timing = json.loads(clock.read_text())
            times = timing["step_end_times"][args.warmup:]
            log = json.loads((out_dir / "log_history.json").read_text())
            tok_s = tokens_per_step * (len(times) - 1) / (times[-1] - times[0])
            result.update(
                steps=len(timing["step_end_times"]), wall_s=round(time.perf_counter() - began, 1),
                s_per_step=round((times[-1] - times[0]) / (len(times) - 1), 3), tok_per_s=round(tok_s),
                tok_per_s_per_gpu=round(tok_s / int(processes)),
                peak_allocated_gib=round(timing["peak_allocated_gib"], 2),
                peak_reserved_gib=round(timing["peak_reserved_gib"], 2),
                losses=[round(e["loss"], 5) for e in log if "loss" in e],
            )
        except Exception as e:  # report and go on to the next run
            result.update(error=f"{type(e).__name__}: {e}"[-1500:])
        report(result, args.out)
    for run in filter(None, args.sft_runs.split(",")):
        strategy, processes = run.split(":")
        setup = TrainSetup(backend="trl", precision="bf16", quantize="none",
                           distributed=DistributedSpec(num_processes=int(processes), strategy=strategy))
        sft = SFTSpec(enabled=True, per_device_batch_size=PAIRS_PER_DEVICE, max_steps=3, max_length=SEQ,
                      gradient_accumulation_steps=EFFECTIVE_PAIRS // PAIRS_PER_DEVICE, logging_steps=1)
        result = {"stage": "sft", "run": run, "shape": args.shape, "gpus": int(processes)}
        began = time.perf_counter()
        try:
            model = launch(train_sft, dict(base=start, data=data, spec=sft, setup=setup,
                                           plan=plan_stage(setup, sft, start.path), seed=0,
                                           out_dir=work / f"sft-{strategy}-{processes}"), int(processes),
                           lambda line: None)
            metrics = json.loads((Path(model.path) / "sft_metrics.json").read_text())
            size = sum(f.stat().st_size for f in Path(model.path).glob("*.safetensors"))
            result.update(wall_s=round(time.perf_counter() - began, 1), loss=metrics.get("loss"),
                          merged_gib=round(size / 2**30, 2), changed=_changed(start.path, model.path))
        except Exception as e:
            result.update(error=f"{type(e).__name__}: {e}"[-1500:])
        report(result, args.out)


def _changed(before: str, after: str) -> bool:
    """Whether merging the SFT adapter changed a projection's weights (it must)."""
    from safetensors import safe_open

    name = "model.layers.0.self_attn.q_proj.weight"

    def tensor(folder: str):
        for file in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                if name in f.keys():
                    return f.get_tensor(name).float()

    return not bool((tensor(before) == tensor(after)).all())


if __name__ == "__main__":
    main()
