"""The one place that decides how a model is trained: Unsloth on an NVIDIA GPU when the `gpu` extra is
installed, else TRL + PEFT (the CPU path CI runs). Everything else asks this module."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from dpoflow.base.config import LoraSpec, TrainSetup
from dpoflow.base.errors import Explained
from dpoflow.base.hardware import GiB, TrainingPlan, weights_dtype
from dpoflow.base.runtime import cache_root

# Unsloth takes explicit module names; "all-linear" means these on Llama-style models.
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class BackendError(RuntimeError, Explained):
    pass


@dataclass(frozen=True)
class BackendChoice:
    name: str  # "unsloth" | "trl"
    reason: str


def choose_backend(setup: TrainSetup) -> BackendChoice:
    import torch

    cuda = torch.cuda.is_available()
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    processes = setup.distributed.num_processes
    if setup.backend == "trl":
        return BackendChoice("trl", "train.backend is trl")
    if processes > 1:
        # Unsloth's own multi-GPU support is not one dpoflow has tested; torchrun + TRL is the standard engine.
        if setup.backend == "unsloth":
            raise BackendError(f"train.backend: unsloth with distributed.num_processes {processes} is not "
                               "supported; use backend auto or trl (TRL + PEFT through torchrun)")
        return BackendChoice("trl", f"auto: {processes} processes through torchrun: TRL + PEFT")
    if setup.backend == "unsloth":
        if not cuda:
            raise BackendError("train.backend: unsloth needs an NVIDIA GPU and none is visible; use auto or trl")
        if not has_unsloth:
            raise BackendError("train.backend: unsloth is not installed; pip install 'dpoflow[gpu]'")
        return BackendChoice("unsloth", "train.backend is unsloth")
    if cuda and has_unsloth:
        return BackendChoice("unsloth", "auto: CUDA GPU and the gpu extra (Unsloth) are present")
    if cuda:
        return BackendChoice("trl", "auto: CUDA GPU but Unsloth is not installed (pip install 'dpoflow[gpu]')")
    return BackendChoice("trl", "auto: no CUDA GPU, TRL + PEFT")


COMPILE_CACHES = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}


def compile_cache_dir() -> Path:
    """Where torch.compile's caches live, under `runtime.cache_root()`: torch's own default is under
    /tmp, which a container loses."""
    return cache_root() / "compile"


def compile_cache_folders() -> dict[str, Path]:
    """Each compile cache's variable -> its folder: the user's setting, else under compile_cache_dir()."""
    root = compile_cache_dir()
    return {variable: Path(os.environ.get(variable) or root / name) for variable, name in COMPILE_CACHES.items()}


def keep_compile_caches() -> None:
    """Point the inductor and Triton caches at their `compile_cache_folders()`, so the compiled kernels
    of one stage serve the next stage and the next run (docs/benchmarks.md)."""
    for variable, folder in compile_cache_folders().items():
        os.environ.setdefault(variable, str(folder))


def activate(choice: BackendChoice, setup: TrainSetup | None = None) -> None:
    """Unsloth patches TRL and transformers when it is imported, so it must be imported before TRL."""
    if choice.name == "unsloth":
        keep_compile_caches()
        import sys

        if "trl" in sys.modules and "unsloth" not in sys.modules:
            raise BackendError("Unsloth must be imported before TRL; call backends.activate() first")
        if setup is not None and setup.precision == "fp8":
            # docs/benchmarks.md: with Unsloth's compile the first FP8 step never finished on an H100.
            os.environ.setdefault("UNSLOTH_COMPILE_DISABLE", "1")
        import unsloth  # noqa: F401


def cap_memory(plan: TrainingPlan) -> None:
    """Hold this process to `train.memory_budget_gib` (an out-of-memory error past it, as on a card that
    size), so the plan made for that budget is what runs; GPU memory only."""
    import torch

    if plan.memory_budget_gib is None or not torch.cuda.is_available():
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, plan.memory_budget_gib * GiB / total))


def load_for_training(choice: BackendChoice, path: str, plan: TrainingPlan, lora: LoraSpec, max_length: int,
                      seed: int):
    """(model, tokenizer, peft_config) ready for a TRL trainer with ref_model=None.

    Both backends attach a fresh LoRA adapter here (seeded) and return `peft_config` None; TRL then
    copies that zero-effect adapter as a frozen "ref", so the reference is the loaded model. One model
    object from load to the trainer is what lets model_reuse reset and reuse it. Under torchrun (TRL
    only) the plain model and `peft_config` go to TRL instead, which wraps it for DDP or FSDP itself.
    """
    from dpoflow.base.ranks import world_size
    from dpoflow.engine.models import load_model, load_tokenizer, torch_dtype
    from dpoflow.engine.training import lora_config

    dtype = weights_dtype(plan)
    if choice.name == "trl":
        if plan.load_in_4bit or plan.precision == "fp8":
            raise BackendError("4-bit and FP8 weights need the unsloth backend (pip install 'dpoflow[gpu]' on a "
                               "CUDA machine), or set train.quantize: none and train.precision: bf16")
        cap_memory(plan)
        model, tokenizer = load_model(path, dtype), load_tokenizer(path)
        if world_size() > 1:
            return model, tokenizer, lora_config(lora)
        from peft import get_peft_model
        from transformers import set_seed

        set_seed(seed)  # the adapter's random init, as Unsloth's random_state does
        return get_peft_model(model, lora_config(lora)), tokenizer, None

    activate(choice)
    cap_memory(plan)
    from unsloth import FastLanguageModel, PatchDPOTrainer

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=path,
        max_seq_length=max_length,
        dtype=torch_dtype(dtype),
        load_in_4bit=plan.load_in_4bit,
        load_in_fp8=plan.precision == "fp8",
        random_state=seed,
    )
    targets = LLAMA_LINEAR if lora.target_modules == "all-linear" else lora.target_modules
    model = FastLanguageModel.get_peft_model(
        model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
        use_gradient_checkpointing="unsloth" if plan.gradient_checkpointing else False, random_state=seed,
    )
    PatchDPOTrainer()  # a no-op in current Unsloth (import does the patching); older releases need it
    reference_tokenizer = load_tokenizer(path)
    tokenizer.chat_template = tokenizer.chat_template or reference_tokenizer.chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, None
