"""export: the LoRA adapter; the adapter merged into the start model as 16-bit safetensors with the
tokenizer, chat template and generation config; GGUF files with an Ollama Modelfile. Every export is
reloaded and checked against the merged model in memory, and a failed check fails the stage."""

from __future__ import annotations

import shutil
from pathlib import Path

from dpoflow.engine import ggufexport
from dpoflow.base.artifacts import fresh_dir, seal
from dpoflow.base.config import ExportSpec
from dpoflow.engine.models import load_model, load_tokenizer, plain_float32, torch_dtype
from dpoflow.base.records import Exports, TrainedAdapter

from . import stage_task

PROBES = ["The capital of France is", "Review: The food was wonderful. Sentiment:", "1 + 1 ="]
RELOAD_TOLERANCE = 1e-4


def export_device() -> str:
    """Where the merge, the probes and the reload check run: the GPU when there is one. A process that
    trained through Unsloth has its patched model classes (attention, rotary caches built on cuda:0), so
    a model built there on the CPU fails with mixed devices, and what runs at all goes through code
    compiled for the GPU (a CPU export there took ~50 s for a 0.5M-parameter model). Every model the
    checks compare is on this one device, so they compare like with like."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def probe_logits(model, tokenizer) -> list:
    import torch

    with torch.no_grad():
        return [model(input_ids=tokenizer(t, return_tensors="pt")["input_ids"].to(model.device)).logits.float().cpu()
                for t in PROBES]


def max_difference(a: list, b: list) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def top1_agreement(a: list, b: list) -> float:
    """Share of probe positions where both give the same most likely next token."""
    same = total = 0
    for x, y in zip(a, b):
        same += (x.argmax(-1) == y.argmax(-1)).sum().item()
        total += x.shape[0] * x.shape[1]
    return same / total


def export_model(adapter: TrainedAdapter, spec: ExportSpec, out_dir: Path) -> Exports:
    with plain_float32():
        return _export_model(adapter, spec, out_dir)


def _export_model(adapter: TrainedAdapter, spec: ExportSpec, out_dir: Path) -> Exports:
    import torch
    from peft import PeftModel

    fresh_dir(out_dir)
    device = export_device()
    adapter_dir = merged_dir = None
    checks: dict[str, float] = {}
    if "adapter" in spec.formats:
        adapter_dir = out_dir / "adapter"
        shutil.copytree(adapter.path, adapter_dir)
    if "merged" in spec.formats or "gguf" in spec.formats:
        # GGUF is converted from the merged folder; without `merged` in formats it is scratch.
        merged_dir = out_dir / ("merged" if "merged" in spec.formats else ".merged-for-gguf")
        tokenizer = load_tokenizer(adapter.start.path)
        merged = PeftModel.from_pretrained(load_model(adapter.start.path, "float32").to(device), adapter.path)
        merged = merged.merge_and_unload().eval()
        exact = probe_logits(merged, tokenizer)
        # Casting rounds the non-persistent buffers too (rotary frequencies, Gemma's embedding scale),
        # which a reload computes afresh in float32: keep them aside and put them back after saving.
        buffers = {name: b.clone() for name, b in merged.named_buffers()}
        merged.to(torch_dtype(spec.dtype)).save_pretrained(merged_dir)
        tokenizer.save_pretrained(merged_dir)
        merged = merged.float()  # the weights as saved, in float32 (16 bits upcast exactly): what is compared
        with torch.no_grad():
            for name, b in merged.named_buffers():
                b.copy_(buffers[name])
        saved_logits = probe_logits(merged, tokenizer)
        reloaded = load_model(str(merged_dir), "float32").to(device).eval()
        saved = merged.state_dict()
        checks["merged_weight_max_diff"] = max(
            (t - saved[name]).abs().max().item() for name, t in reloaded.state_dict().items())
        if checks["merged_weight_max_diff"] != 0.0:
            raise RuntimeError(f"{merged_dir}: saved weights differ from the merged model "
                               f"(max difference {checks['merged_weight_max_diff']:.3g})")
        # Reloaded from disk, the model must compute what the in-memory one does (the same config,
        # tokenizer and weights), to 1e-4.
        checks["merged_max_logit_diff_reloaded"] = max_difference(probe_logits(reloaded, tokenizer), saved_logits)
        if checks["merged_max_logit_diff_reloaded"] > RELOAD_TOLERANCE:
            raise RuntimeError(f"{merged_dir}: the reloaded model's logits differ from the in-memory model's by "
                               f"{checks['merged_max_logit_diff_reloaded']:.3g} > {RELOAD_TOLERANCE}")
        # Rounding to 16 bits moves logits (Gemma 270M in bf16: up to 2.8 on logits near 34); reported,
        # with how often the top token stays the same, not gated.
        checks["merged_max_logit_diff_vs_fp32"] = max_difference(saved_logits, exact)
        checks["merged_top1_agreement_vs_fp32"] = top1_agreement(saved_logits, exact)
    gguf = {}
    if "gguf" in spec.formats:
        gguf = export_gguf(merged, tokenizer, merged_dir, spec, out_dir / "gguf")
        if "merged" not in spec.formats:
            shutil.rmtree(merged_dir)
            merged_dir = None
    return Exports(path=str(out_dir), digest=seal(out_dir), checks=checks, gguf=gguf,
                   adapter=str(adapter_dir) if adapter_dir else None,
                   merged=str(merged_dir) if merged_dir else None)


def export_gguf(merged, tokenizer, merged_dir: Path, spec: ExportSpec, out_dir: Path) -> dict[str, dict]:
    """Each requested GGUF type, verified in llama.cpp; quantizer types are made from an f16 file."""
    missing = ggufexport.missing_tools()
    if missing:
        raise ggufexport.GGUFError(f"export.formats has gguf but {', '.join(missing)} is not installed: "
                                   "pip install 'dpoflow[gguf]'")
    out_dir.mkdir(parents=True)
    ref = ggufexport.reference(merged, tokenizer)
    results: dict[str, dict] = {}
    f16 = out_dir / "model-f16.gguf"
    for gguf_type in sorted(spec.gguf_types, key=lambda t: t not in ggufexport.CONVERTER_TYPES):
        target = out_dir / f"model-{gguf_type}.gguf"
        if gguf_type in ggufexport.CONVERTER_TYPES:
            ggufexport.convert(merged_dir, gguf_type, target, spec.gguf_pre_tokenizer)
        else:
            if not f16.exists():
                ggufexport.convert(merged_dir, "f16", f16, spec.gguf_pre_tokenizer)
            ggufexport.quantize(f16, gguf_type, target)
        results[gguf_type] = {"file": str(target), **ggufexport.verify(target, gguf_type, ref, tokenizer)}
    if "f16" not in spec.gguf_types:
        f16.unlink(missing_ok=True)
    preferred = next(t for t in ("q4_k_m", "q8_0", *spec.gguf_types) if t in spec.gguf_types)
    (out_dir / "Modelfile").write_text(ggufexport.modelfile(f"model-{preferred}.gguf", tokenizer.eos_token))
    return results


@stage_task
def export_task(out_dir: str, adapter: TrainedAdapter, spec: ExportSpec) -> Exports:
    return export_model(adapter, spec, Path(out_dir))
