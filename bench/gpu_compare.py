"""DPO throughput side by side on one GPU: plain TRL with a separate reference copy, TRL + PEFT with
`ref_model=None`, Unsloth (bf16 and 4-bit), and dpoflow's own `dpo` stage with its default GPU
settings. Random-weight Llama shape, 4 pairs x 2 x 512 tokens per micro-batch, LoRA r=16 on all seven
projections, lr 5e-6, beta 0.1, gradient checkpointing on (each framework's own).

Each configuration runs in its own process (Unsloth patches TRL when imported, so it cannot share a
process with the plain-TRL runs); the parent builds the model and data once and prints a table.

    python3 bench/gpu_compare.py --shape llama-3.2-1b --configs all [--steps 14]

Reported per configuration: import seconds (trl or unsloth), model load seconds, first step seconds,
median s/step over the steps after the first 3 (>= 10 of them), tokens/s = tokens per step / median
s/step, peak allocated and reserved GiB, and MFU = 6 x N x tokens/s / peak. N is the parameter count
without the input embedding. 6N per token counts the policy forward (2N), the backward through
activations (2N; LoRA leaves the base weights without gradients) and the reference forward (2N).
`mfu_hw` also counts what the GPU did: 8N with gradient checkpointing (the policy forward runs again in
the backward pass), 6N without. The peak is the bf16 matmul ceiling measured on an H100 (772 TFLOP/s),
used for the H200 too (same SM count and clocks; its extra memory bandwidth does not raise the ceiling).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

CONFIGS = ("trl-refcopy", "trl-peft", "unsloth-bf16", "unsloth-bf16-mb8", "unsloth-bf16-mb16", "unsloth-bf16-mb32",
           "unsloth-bf16-mb8-nogc", "unsloth-4bit", "dpoflow", "dpoflow-gc", "dpoflow-noshare", "dpoflow-mb8",
           "dpoflow-mb8-gc", "dpoflow-mb16", "dpoflow-budget24", "dpoflow-4bit-budget24",
           "dpoflow-4bit", "dpoflow-precomputed", "dpoflow-trl",
           "dpoflow-mb8-precomputed", "dpoflow-mb16-precomputed")
# Unsloth alone: 4 pairs a micro-batch and its gradient checkpointing unless the name says otherwise.
UNSLOTH = {"unsloth-bf16-mb8": {"pairs": 8}, "unsloth-bf16-mb16": {"pairs": 16}, "unsloth-bf16-mb32": {"pairs": 32},
           "unsloth-bf16-mb8-nogc": {"pairs": 8, "checkpointing": False}}
# dpoflow variants: the `dpo` stage with its GPU defaults (prompt sharing on, gradient checkpointing as the
# planner decides), changed in one setting each.
DPOFLOW = {"dpoflow": {}, "dpoflow-gc": {"checkpointing": True}, "dpoflow-noshare": {"share_prompt": False},
           "dpoflow-mb8": {"pairs": 8}, "dpoflow-mb8-gc": {"pairs": 8, "checkpointing": True},
           "dpoflow-mb16": {"pairs": 16},
           # planned for a 24 GiB card (train.memory_budget_gib: 24), 16-bit and 4-bit weights
           "dpoflow-budget24": {"pairs": 8, "budget": 24},
           "dpoflow-4bit-budget24": {"pairs": 8, "quantize": "4bit", "budget": 24},
           "dpoflow-4bit": {"quantize": "4bit"}, "dpoflow-precomputed": {"precompute": True},
           "dpoflow-trl": {"backend": "trl"}, "dpoflow-mb8-precomputed": {"pairs": 8, "precompute": True},
           "dpoflow-mb16-precomputed": {"pairs": 16, "precompute": True}}
PAIRS, SEQ, WARMUP = 4, 512, 3
MOST_PAIRS = 32  # the largest micro-batch of any configuration: the data holds that many a step
PEAK_FLOPS = 772e12
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--configs", default="all")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_config(args.worker, Path(args.work), args.steps)), flush=True)
        return

    from common import report, run_worker, scratch
    from gpu_dpo import build_model, make_pairs

    from dpoflow.engine.models import load_tokenizer

    work = scratch()
    build_model(args.shape, work / "model")
    make_pairs(load_tokenizer(str(work / "model")), MOST_PAIRS * args.steps, SEQ // 2, SEQ // 2, work / "train.jsonl")
    results = []
    for config in (CONFIGS if args.configs == "all" else args.configs.split(",")):
        result, proc = run_worker([__file__, "--worker", config, "--work", str(work), "--steps", str(args.steps)])
        result = result or {"config": config, "error": proc.stderr[-1500:]}
        result["shape"] = args.shape
        results.append(result)
        report(result, args.out, prefix="")
    print(table(results))


def table(results: list[dict]) -> str:
    rows = ["| config | tok/s | s/step | MFU (6N) | MFU (hardware) | checkpointing | peak alloc / reserved GiB | "
            "import s | load s | first step s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['config']} | error: {r['error'][-200:]!r} |")
            continue
        rows.append(f"| {r['config']} | {r['tok_per_s']:,} | {r['s_per_step']} | {r['mfu']:.0%} | {r['mfu_hw']:.0%} | "
                    f"{'on' if r['gradient_checkpointing'] else 'off'} | "
                    f"{r['peak_alloc_gib']} / {r['peak_reserved_gib']} | {r['import_s']} | {r['load_s']} | "
                    f"{r['first_step_s']} |")
    return "\n".join(rows)


def run_config(config: str, work: Path, steps: int) -> dict:
    began = time.perf_counter()
    if config.startswith(("unsloth", "dpoflow")) and config != "dpoflow-trl":
        import unsloth  # noqa: F401  (before trl: it patches TRL and transformers)
    import torch
    import trl  # noqa: F401

    from dpoflow.engine.training import step_clock

    imported = time.perf_counter()
    clock = step_clock(work / f"clock-{config}.json")
    torch.cuda.reset_peak_memory_stats()
    loaded = time.perf_counter()
    reference_s, sharing, plan = None, None, None
    pairs = {**DPOFLOW, **UNSLOTH}.get(config, {}).get("pairs", PAIRS)
    checkpointing = UNSLOTH.get(config, {}).get("checkpointing", True)
    if config.startswith("dpoflow"):
        started, log, reference_s, sharing, plan = _dpoflow(work, steps, clock, **DPOFLOW[config])
        checkpointing = plan["gradient_checkpointing"]
        loaded = started
    else:
        trainer = _trainer(config, work, steps, clock, pairs, checkpointing)
        loaded = time.perf_counter()
        trainer.train()
        log = trainer.state.log_history
    losses = [e["loss"] for e in log if "loss" in e]
    t = clock.times
    per_step = statistics.median(b - a for a, b in zip(t[WARMUP:], t[WARMUP + 1:]))
    tokens = pairs * 2 * SEQ
    n = _params_without_embedding(work / "model")
    return {"config": config, "gpu": torch.cuda.get_device_name(), "steps": len(t),
            "import_s": round(imported - began, 1), "load_s": round(loaded - imported, 1),
            "first_step_s": round(t[0] - loaded, 1), "s_per_step": round(per_step, 3),
            "tok_per_s": round(tokens / per_step), "mfu": 6 * n * tokens / per_step / PEAK_FLOPS,
            "gradient_checkpointing": checkpointing,
            "mfu_hw": (8 if checkpointing else 6) * n * tokens / per_step / PEAK_FLOPS,
            "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            # The first steps' numbers, to set the configurations side by side on the same batches.
            "first_steps": [{k: e[k] for k in ("loss", "logps/chosen", "logps/rejected", "rewards/margins") if k in e}
                            for e in log if "loss" in e][:4],
            # With the reference pass precomputed: its seconds, and tokens/s over pass + steady steps.
            "reference_pass_s": round(reference_s, 2) if reference_s is not None else None,
            "prompt_sharing": sharing, "plan": plan,
            "tok_per_s_incl_reference": round(tokens * len(t) / (len(t) * per_step + reference_s))
            if reference_s is not None else None}


def _dataset(work: Path):
    from datasets import Dataset

    from dpoflow.base.artifacts import read_jsonl_rows

    return Dataset.from_list(read_jsonl_rows(work / "train.jsonl"))


def _args(steps: int, pairs: int = PAIRS, checkpointing: bool = True, **extra):
    from trl import DPOConfig

    return DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=pairs, gradient_accumulation_steps=1,
                     max_steps=steps, learning_rate=5e-6, beta=0.1, max_length=SEQ, logging_steps=1,
                     lr_scheduler_type="constant", bf16=True, gradient_checkpointing=checkpointing, save_strategy="no",
                     report_to=[], seed=0, **extra)


def _trainer(config: str, work: Path, steps: int, clock, pairs: int = PAIRS, checkpointing: bool = True):
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    path = str(work / "model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if config.startswith("unsloth"):
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(path, max_seq_length=SEQ, dtype=torch.bfloat16,
                                                             load_in_4bit=config == "unsloth-4bit")
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=TARGETS,
                                                 use_gradient_checkpointing="unsloth" if checkpointing else False,
                                                 random_state=0)
        peft_config, ref = None, None
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
        peft_config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda() if config == "trl-refcopy" else None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return DPOTrainer(model=model, ref_model=ref, args=_args(steps, pairs, checkpointing), train_dataset=_dataset(work),
                      processing_class=tokenizer, peft_config=peft_config, callbacks=[clock])


def _dpoflow(work: Path, steps: int, clock, precompute: bool = False, share_prompt: bool = True, pairs: int = PAIRS,
             quantize: str = "auto", backend: str = "auto", checkpointing: bool | None = None,
             budget: float | None = None) -> tuple[float, list[dict], float | None, dict, dict]:
    """The pipeline's own stage with the defaults a GPU user gets (train: backend/precision/quantize
    auto, prompt sharing on, gradient checkpointing as planned); only the batch, steps and sequence
    length are the benchmark's.
    `precompute`: the reference log-probs come from the `reference` stage's pass first (timed on its
    own). `budget`: train.memory_budget_gib."""
    import torch

    from dpoflow.base.config import DPOSpec, LoraSpec, TrainSetup
    from dpoflow.base.hardware import plan_stage
    from dpoflow.engine.backends import choose_backend
    from dpoflow.tasks.dpo import compute_reference_logps, train_dpo
    from gpu_dpo import bench_records

    setup = TrainSetup(quantize=quantize, backend=backend, memory_budget_gib=budget)
    spec = DPOSpec(per_device_batch_size=pairs, gradient_accumulation_steps=1, max_steps=steps, max_length=SEQ,
                   logging_steps=1, lr_scheduler="constant", lora=LoraSpec(r=16, alpha=16),
                   precompute_ref_log_probs=precompute, share_prompt=share_prompt,
                   gradient_checkpointing=checkpointing)
    start, data = bench_records(work, "random")
    plan = plan_stage(setup, spec, start.path, backend=choose_backend(setup).name)
    reference, reference_s = None, None
    if precompute:
        began = time.perf_counter()
        reference = compute_reference_logps(start, data, spec, setup, plan, 0, work / "reference")
        torch.cuda.synchronize()
        reference_s = time.perf_counter() - began
    began = time.perf_counter()
    adapter = train_dpo(start, data, spec, setup, plan, 0, work / f"out-dpoflow-{time.time_ns()}", reference=reference,
                        callbacks=(clock,))
    out = Path(adapter.path).parent
    metrics = json.loads((out / "dpo_metrics.json").read_text())
    sharing = {k: v for k, v in metrics.items() if k.startswith("prompt_sharing/")}
    planned = {k: getattr(plan, k) for k in ("per_device_batch", "gradient_accumulation_steps", "load_in_4bit",
                                             "gradient_checkpointing")}
    return began, json.loads((out / "log_history.json").read_text()), reference_s, sharing, planned


def _params_without_embedding(model_dir: Path) -> int:
    """Parameters that do matmul work per token: all but the input embedding lookup (with tied
    embeddings the same matrix is also the LM head, which does work, so it stays)."""
    from safetensors import safe_open

    sizes = {}
    for file in model_dir.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                sizes[name] = 1
                for d in shape:
                    sizes[name] *= d
    embedding = sum(n for name, n in sizes.items() if "embed_tokens" in name)
    tied = not any("lm_head" in name for name in sizes)
    return sum(sizes.values()) - (0 if tied else embedding)


if __name__ == "__main__":
    main()
