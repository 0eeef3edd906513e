"""Where the export's model work goes in a process that imported Unsloth, as `dpoflow run` on a GPU does.

Two moments of such a process: before any model was loaded through Unsloth (a re-run whose training
stages are cached: only `import unsloth` has run) and after (a run that trained: Unsloth has patched
the Llama classes). In each, the export's probe forwards on a fresh float32 model: on the CPU (what
export did before it chose the GPU) and on the GPU, with torch.compile'd code as it is and forced eager
(what export does now). Prints seconds, the graphs dynamo compiled, and the error where one is raised.

    python bench/gpu_export.py
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path


def main() -> None:
    import torch

    from dpoflow.engine.backends import BackendChoice, activate

    started = time.perf_counter()
    activate(BackendChoice("unsloth", "bench"))
    print(f"import unsloth: {time.perf_counter() - started:.1f} s")
    from torch._dynamo.utils import counters

    from dpoflow.engine.models import load_model, load_tokenizer
    from dpoflow.tasks.export import probe_logits
    from dpoflow.engine.tiny import build_tiny_model

    path = str(build_tiny_model("tiny-llama", Path(tempfile.mkdtemp()) / "model"))
    tokenizer = load_tokenizer(path)

    def probe(moment: str, device: str, eager: bool) -> None:
        graphs = counters["stats"]["unique_graphs"]
        t = time.perf_counter()
        try:
            model = load_model(path, "float32").to(device).eval()
            with torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext():
                probe_logits(model, tokenizer)
            outcome = "ok"
        except Exception as e:  # noqa: BLE001 - the error is the finding
            outcome = f"{type(e).__name__}: {str(e)[:160]}"
        print(f"{moment:<26} {device:<4} {'eager' if eager else 'compiled':<8} {time.perf_counter() - t:7.2f} s  "
              f"graphs compiled {counters['stats']['unique_graphs'] - graphs:<3} {outcome}", flush=True)

    for device, eager in (("cpu", False), ("cpu", True), ("cuda", False), ("cuda", True)):
        probe("unsloth imported", device, eager)
    from unsloth import FastLanguageModel

    FastLanguageModel.from_pretrained(model_name=path, max_seq_length=128, dtype=torch.bfloat16)
    for device, eager in (("cpu", False), ("cpu", True), ("cuda", False), ("cuda", True)):
        probe("after an Unsloth load", device, eager)


if __name__ == "__main__":
    main()
