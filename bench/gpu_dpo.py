"""dpoflow's dpo stage (tasks/dpo.train_dpo) on a GPU: Unsloth backend, random-weight Llama shape,
4 pairs x 2 x 512 tokens a step. Prints one JSON line per mode: tokens/s over the steady steps,
peak GPU memory, whether every logged loss was finite.

    python bench/gpu_dpo.py --modes bf16,4bit [--shape llama-3.2-1b] [--steps 13]
    python bench/gpu_dpo.py --modes fp8      # sets UNSLOTH_COMPILE_DISABLE=1 (see docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import report  # noqa: E402

SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False),
}


def build_model(shape: str, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpoflow.engine.tiny import build_tokenizer

    tok = build_tokenizer()
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    torch.cuda.empty_cache()


def bench_records(work: Path, source: str):
    """(start model, prepared data) records for the model and pairs built in `work`."""
    from dpoflow.base.records import ModelRef, PreparedData

    data = PreparedData(path=str(work), digest="bench", train=str(work / "train.jsonl"), heldout="", rejected="",
                        counts={})
    return ModelRef(path=str(work / "model"), digest="bench", source=source, role="base"), data


def make_pairs(tok, n_pairs: int, prompt_tokens: int, completion_tokens: int, out: Path) -> None:
    from dpoflow.base.artifacts import write_jsonl

    words = (REPO / "dpoflow" / "builtin" / "tiny_corpus.txt").read_text().split()
    rng = random.Random(0)

    def text(n_tokens: int) -> str:
        ids: list[int] = []
        while len(ids) < n_tokens:
            ids += tok(" " + rng.choice(words))["input_ids"]
        return tok.decode(ids[:n_tokens])

    rows = []
    for _ in range(n_pairs):
        prompt = tok.apply_chat_template([{"role": "user", "content": text(prompt_tokens - 8)}], tokenize=False,
                                         add_generation_prompt=True)
        rows.append({"prompt": prompt, "chosen": text(completion_tokens - 1) + tok.eos_token,
                     "rejected": text(completion_tokens - 1) + tok.eos_token})
    write_jsonl(out, rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", default="bf16,4bit")
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=13)
    parser.add_argument("--out", default=None, help="append the JSON lines to this file too")
    args = parser.parse_args()

    from dpoflow.engine.backends import activate, choose_backend
    from dpoflow.base.config import DPOSpec, LoraSpec, TrainSetup

    # Unsloth before transformers, peft, trl (and with its compile off when FP8 is measured)
    activate(choose_backend(TrainSetup(backend="unsloth")),
             TrainSetup(backend="unsloth", precision="fp8" if "fp8" in args.modes else "bf16"))
    import torch

    from dpoflow.base.hardware import plan_stage
    from dpoflow.engine.models import load_tokenizer
    from dpoflow.tasks import dpo
    from dpoflow.engine.training import step_clock
    from common import scratch

    work = scratch()
    build_model(args.shape, work / "model")
    tok = load_tokenizer(str(work / "model"))
    pairs_per_step, seq = 4, 512
    make_pairs(tok, pairs_per_step * args.steps, seq // 2, seq // 2, work / "train.jsonl")
    start, data = bench_records(work, f"random {args.shape}")

    for mode in args.modes.split(","):
        setup = TrainSetup(backend="unsloth", precision="fp8" if mode == "fp8" else "bf16",
                           quantize="4bit" if mode == "4bit" else "none")
        spec = DPOSpec(learning_rate=5e-6, beta=0.1, per_device_batch_size=pairs_per_step,
                       gradient_accumulation_steps=1, max_steps=args.steps, max_length=seq, logging_steps=1,
                       lr_scheduler="constant", lora=LoraSpec(r=16, alpha=16))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        timer = step_clock(work / f"clock-{mode}.json")
        began = time.perf_counter()
        result = {"mode": mode, "shape": args.shape, "gpu": torch.cuda.get_device_name()}
        try:
            plan = plan_stage(setup, spec, start.path, backend="unsloth")
            result["plan"] = {"precision": plan.precision, "load_in_4bit": plan.load_in_4bit,
                              "per_device_batch": plan.per_device_batch}
            adapter = dpo.train_dpo(start, data, spec, setup, plan, 0, work / f"out-{mode}", callbacks=(timer,))
            log = json.loads((Path(adapter.path).parent / "log_history.json").read_text())
            losses = [e["loss"] for e in log if "loss" in e]
            steady = timer.times[3:]
            tokens_per_step = pairs_per_step * 2 * seq
            result.update(
                steps=len(timer.times),
                first_step_s=round(timer.times[0] - began, 1),
                tok_per_s=round(tokens_per_step * (len(steady) - 1) / (steady[-1] - steady[0])),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                losses_finite=all(math.isfinite(x) for x in losses),
                first_loss=losses[0], last_loss=losses[-1],
                reference=adapter.reference,
            )
        except Exception as e:  # report and go on to the next mode
            result.update(error=f"{type(e).__name__}: {e}"[:500])
        report(result, args.out)


if __name__ == "__main__":
    main()
