"""One loaded training model kept between the DPO stages of one flow: the reference pass and the `dpo`
stage of a pipeline, or every variant of a sweep. Each stage after the first skips the model load
(about 13 s at the 8B shape on an H100, docs/benchmarks.md).

A DPO stage hands TRL a PEFT model with a fresh adapter, and training changes that model in place:
the adapter's weights, the frozen "ref" adapter TRL adds, instance `forward` patches (TRL's fused LM
head, prompt sharing, accelerate's autocast wrapper), hooks and `requires_grad` flags. `Kept`
snapshots all of that right after the load and puts it back before the next stage takes the model,
so every stage starts from what a fresh load gives (tests/test_model_reuse.py: the trained adapters
are identical).

The flow owns a `ModelKeeper` (a `with` block) and hands it to the training stages it wants to share a
model; a stage given none loads its own model and frees it when done. The keeper is no part of a
stage's cache key (tasks.RUN_ONLY) and is not sent to launched ranks (distributed.NOT_SENT).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Hashable
from typing import Any

# Module hook tables that training may add to (TRL's input-grad hook, accelerate, Unsloth).
HOOK_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


class Kept:
    """A loaded (PEFT model, tokenizer) and the state it had when loaded."""

    def __init__(self, key: Hashable, model, tokenizer):
        self.key, self.model, self.tokenizer = key, model, tokenizer
        self.adapters = set(model.peft_config)
        self.active_adapter = model.active_adapter
        self.training = model.training
        params = dict(model.named_parameters())
        self.requires_grad = {name: p.requires_grad for name, p in params.items()}
        # The fresh adapter's weights (LoRA A random, B zero), kept in host memory: up to a few hundred MB
        # that the accelerator then need not hold beside the training.
        self.fresh = {name: p.detach().to("cpu", copy=True) for name, p in params.items() if p.requires_grad}
        self.modules = [(module, module.__dict__.get("forward"),
                         {table: set(getattr(module, table, {})) for table in HOOK_TABLES})
                        for module in model.modules()]

    def restore(self) -> None:
        """Put the model back as it was loaded: adapters, weights, flags, forwards and hooks."""
        import torch

        model = self.model
        for name in set(model.peft_config) - self.adapters:
            model.delete_adapter(name)
        model.set_adapter(self.active_adapter)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in self.fresh:
                    param.copy_(self.fresh[name])
                param.requires_grad_(self.requires_grad[name])
                param.grad = None
        for module, forward, hooks in self.modules:
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward
            for table, keys in hooks.items():
                added = getattr(module, table, {})
                for handle in [k for k in added if k not in keys]:
                    del added[handle]
        model.train(self.training)


class ModelKeeper:
    """Keeps at most one loaded training model for the stages it is given to (`take`), and frees it
    on `release` or at the end of its `with` block. The stages of one flow run one at a time (whichever
    Prefect worker thread runs them), so it needs no lock."""

    def __init__(self):
        self.kept: Kept | None = None
        self.loads = self.reuses = 0
        self.frozen_before = gc.get_freeze_count() > 0  # the CLI froze its imports (runtime.freeze_imports)

    def __enter__(self) -> ModelKeeper:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def take(self, key: Hashable, load: Callable[[], tuple[Any, Any, Any]], log: Callable[[str], Any]):
        """`load()`'s (model, tokenizer, peft_config), or the kept model reset to how it was loaded, when
        it was loaded under the same `key`: the same start model, weights precision, LoRA, max length
        and seed."""
        if self.kept is not None and self.kept.key == key:
            self.kept.restore()
            self.reuses += 1
            self._freeze()
            log("model: the one the previous stage loaded, reset to its fresh adapter (no load)")
            return self.kept.model, self.kept.tokenizer, None
        self.release()
        model, tokenizer, peft_config = load()
        self.loads += 1
        if peft_config is None:  # a PEFT model we can reset; with a peft_config TRL wraps it per trainer
            self.kept = Kept(key, model, tokenizer)
            self._freeze()
        return model, tokenizer, peft_config

    def _freeze(self) -> None:
        """Take what is alive now out of the collector's reach until `release`: the kept model, the
        imported Unsloth/TRL modules, compiled graphs. Unsloth and TRL run several full collections in
        every stage; over that whole heap they cost ~2.6 s a stage at the 8B shape (docs/benchmarks.md),
        while the garbage they are there for is the stage's own, which stays collectable. Collected
        first: the previous stage's trainer, unreachable once `restore` dropped its hooks, is freed
        now rather than frozen with its optimizer state."""
        gc.collect()
        gc.freeze()

    def release(self) -> None:
        """Free the kept model now, before another training model is loaded: never two at once."""
        if self.kept is None:
            return
        self.kept = None
        # A kept model is always frozen (`_freeze`): unfrozen first, so its reference cycles (and
        # anything else that died since the freeze) are collected now and its memory really goes back.
        gc.unfreeze()
        free_accelerator_memory()
        if self.frozen_before:
            gc.freeze()  # as the CLI left it: everything alive after its imports is long-lived


def training_model(keeper: ModelKeeper | None, key: Hashable, load: Callable[[], tuple[Any, Any, Any]],
                   log: Callable[[str], Any] = print):
    """`load()`'s (model, tokenizer, peft_config), or with a `keeper` what its `take` gives."""
    return load() if keeper is None else keeper.take(key, load, log)


def free_accelerator_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
