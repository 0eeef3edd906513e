"""What stays allocated on the GPU after a stage has freed its model, and where it was allocated.

Runs, in one process as the CLI would: a bare model load through the stage's backend, a `dpo` stage,
an `sft` stage; after each, the model is freed and the memory still allocated is reported, with the
allocation stack of every live block of 8 MiB or more (torch's memory history) and the CUDA tensors
the garbage collector can still reach. Then torch's compiler caches are reset, to see if they hold it.

    python3 bench/gpu_retained.py --shape llama-3.2-1b
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SEQ = 512
MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--with-sft", action="store_true", help="also run an SFT stage and measure after it")
    args = parser.parse_args()

    import torch

    from common import scratch
    from gpu_dpo import bench_records, build_model, make_pairs

    from dpoflow.engine.backends import activate, choose_backend, load_for_training
    from dpoflow.base.config import DPOSpec, LoraSpec, SFTSpec, TrainSetup
    from dpoflow.base.hardware import plan_stage
    from dpoflow.engine.model_reuse import free_accelerator_memory
    from dpoflow.engine.models import load_tokenizer
    from dpoflow.base.runtime import freeze_imports

    work = scratch()
    build_model(args.shape, work / "model")
    make_pairs(load_tokenizer(str(work / "model")), args.pairs, SEQ // 2, SEQ // 2, work / "train.jsonl")
    free_accelerator_memory()
    freeze_imports()
    setup = TrainSetup()
    backend = choose_backend(setup)
    activate(backend, setup)
    start, data = bench_records(work, "random")
    lora = LoraSpec(r=16, alpha=16)
    dpo = DPOSpec(per_device_batch_size=4, gradient_accumulation_steps=1, max_steps=2, max_length=SEQ, lora=lora,
                  logging_steps=1)
    sft = SFTSpec(per_device_batch_size=4, gradient_accumulation_steps=1, max_steps=2, max_length=SEQ, lora=lora)
    torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
    base = torch.cuda.memory_allocated()
    report = {"backend": backend.name, "allocated_at_start_mib": round(base / MIB)}

    def after(name):
        free_accelerator_memory()
        report[name] = {"allocated_mib": round((torch.cuda.memory_allocated() - base) / MIB),
                        "live_blocks": live_blocks(torch)[:3], "reachable_cuda_tensors": reachable(torch)}
        print(name, json.dumps(report[name])[:3000], flush=True)

    def load_only():
        loaded = load_for_training(backend, start.path, plan_stage(setup, dpo, start.path, backend=backend.name), lora, SEQ, 0)
        del loaded

    load_only()
    after("after_load_and_free")
    from dpoflow.tasks.dpo import train_dpo

    train_dpo(start, data, dpo, setup, plan_stage(setup, dpo, start.path, backend=backend.name), 0, work / "dpo")
    after("after_dpo_stage")
    if args.with_sft:
        from dpoflow.tasks.sft import train_sft

        train_sft(start, data, sft, setup, plan_stage(setup, sft, start.path, backend=backend.name), 0, work / "sft")
        after("after_sft_stage")
    torch._dynamo.reset()
    print("RESULT " + json.dumps(report), flush=True)


def live_blocks(torch) -> list[dict]:
    """Allocated blocks of 8 MiB or more, with the Python frames that allocated them (innermost last)."""
    found = []
    for segment in torch.cuda.memory._snapshot()["segments"]:
        for block in segment["blocks"]:
            if block["state"] != "active_allocated" or block["size"] < 8 * MIB:
                continue
            frames = [f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in block.get("frames", [])
                      if f["filename"].endswith(".py")]
            found.append({"mib": round(block["size"] / MIB), "frames": frames[:12]})
    return sorted(found, key=lambda b: -b["mib"])[:12]


def reachable(torch) -> list[dict]:
    """CUDA tensors the collector can reach, largest first, with what holds them."""
    gc.unfreeze()  # get_referrers searches only unfrozen objects; import-time caches are frozen
    tensors = []
    for obj in gc.get_objects():
        try:  # graphs' fake and symbolic-shape tensors are in the heap too: only real ones count
            if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.is_cuda:
                size = int(obj.untyped_storage().nbytes())
                if size >= MIB:
                    tensors.append((size, obj))
        except Exception:  # noqa: BLE001
            continue
    tensors.sort(key=lambda pair: -pair[0])
    own = {id(tensors), *(id(pair) for pair in tensors)}
    return [{"mib": round(size / MIB), "shape": [int(x) for x in t.shape], "held_by": holders(t, own)}
            for size, t in tensors[:4]]


def holders(obj, own: set, depth: int = 7) -> list:
    """Who refers to `obj`, and who to them, `depth` levels up: type names, frames (code and line), a dict's first keys, a
    function's or module's name."""
    import types

    if depth == 0:
        return []
    found = []
    referrers = gc.get_referrers(obj)
    own.add(id(referrers))
    for ref in referrers:
        if (id(ref) in own or type(ref).__name__ == "list_iterator" or isinstance(ref, list) and len(ref) > 100_000
                or isinstance(ref, types.FrameType) and ref.f_code.co_filename == __file__):  # the probe's own walk
            continue
        own.add(id(ref))
        label = type(ref).__name__
        if isinstance(ref, types.FrameType):  # a live call or one kept by a stored exception's traceback
            label += f" {ref.f_code.co_qualname} {Path(ref.f_code.co_filename).name}:{ref.f_lineno}"
        elif isinstance(ref, BaseException):
            label += f" {str(ref)[:80]!r}"
        elif isinstance(ref, dict):
            label += " keys=" + ",".join(repr(k)[:40] for k in list(ref)[:5])
        elif isinstance(ref, (types.FunctionType, types.ModuleType, type)):
            label += f" {getattr(ref, '__module__', '')}.{getattr(ref, '__qualname__', getattr(ref, '__name__', ''))}"
        elif hasattr(ref, "__wrapped__"):
            label += " wrapping " + getattr(ref.__wrapped__, "__qualname__", "?")
        found.append({label: holders(ref, own, depth - 1)})
        if len(found) >= 4:
            break
    return found


if __name__ == "__main__":
    main()
