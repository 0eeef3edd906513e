"""The DPO stages a flow gives one `ModelKeeper` share one loaded model, and a stage on the kept model
trains exactly as it does on a freshly loaded one."""

import gc
import json
import weakref

import pytest
import torch
from safetensors.torch import load_file

from dpoflow.engine import model_reuse
from dpoflow.base.config import DPOSpec, TrainSetup
from dpoflow.base.hardware import plan_stage
from dpoflow.tasks.dpo import compute_reference_logps, train_dpo

TRL = TrainSetup(backend="trl")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="exact float32 equality on the CPU")


def spec(**fields) -> DPOSpec:
    return DPOSpec(**{"max_steps": 3, "per_device_batch_size": 4, "gradient_accumulation_steps": 1,
                      "logging_steps": 1, "lr_scheduler": "constant", "learning_rate": 1e-2, **fields})


def train(pairs, out, dpo: DPOSpec, reference=None, keeper=None):
    start, data, _ = pairs
    train_dpo(start, data, dpo, TRL, plan_stage(TRL, dpo, start.path), 0, out, reference=reference, keeper=keeper)
    return load_file(out / "adapter" / "adapter_model.safetensors"), json.loads((out / "log_history.json").read_text())


@cpu_only
def test_a_variant_trained_on_the_kept_model_equals_one_trained_on_a_fresh_load(tmp_path, yes_no_pairs):
    fresh, fresh_log = train(yes_no_pairs, tmp_path / "fresh", spec(beta=0.1))
    with model_reuse.ModelKeeper() as scope:
        other, _ = train(yes_no_pairs, tmp_path / "other", spec(beta=0.5, learning_rate=3e-2), keeper=scope)
        reused, reused_log = train(yes_no_pairs, tmp_path / "reused", spec(beta=0.1), keeper=scope)
        assert scope.loads == 1 and scope.reuses == 1
    assert fresh.keys() == reused.keys()
    assert all(torch.equal(fresh[k], reused[k]) for k in fresh)
    assert not all(torch.equal(fresh[k], other[k]) for k in fresh)  # the other variant did train differently
    assert [e.get("loss") for e in reused_log] == [e.get("loss") for e in fresh_log]


@cpu_only
def test_the_reference_pass_and_the_dpo_stage_share_one_load(tmp_path, yes_no_pairs):
    start, data, _ = yes_no_pairs
    dpo = spec(precompute_ref_log_probs=True)
    plan = plan_stage(TRL, dpo, start.path)
    fresh_reference = compute_reference_logps(start, data, dpo, TRL, plan, 0, tmp_path / "ref-fresh")
    fresh, _ = train(yes_no_pairs, tmp_path / "fresh", dpo, fresh_reference)
    with model_reuse.ModelKeeper() as scope:
        reference = compute_reference_logps(start, data, dpo, TRL, plan, 0, tmp_path / "ref", keeper=scope)
        reused, log = train(yes_no_pairs, tmp_path / "reused", dpo, reference, keeper=scope)
        assert scope.loads == 1
    assert (tmp_path / "ref" / "reference_logps.jsonl").read_text() == \
        (tmp_path / "ref-fresh" / "reference_logps.jsonl").read_text()
    assert all(torch.equal(fresh[k], reused[k]) for k in fresh)
    assert abs(log[0]["rewards/margins"]) < 1e-6  # the reference is still the start model


def test_another_model_or_seed_replaces_the_kept_one_and_leaving_frees_it(tmp_path, yes_no_pairs):
    start, data, _ = yes_no_pairs
    dpo = spec(max_steps=1)
    plan = plan_stage(TRL, dpo, start.path)
    with model_reuse.ModelKeeper() as scope:
        train_dpo(start, data, dpo, TRL, plan, 0, tmp_path / "a", keeper=scope)
        first = weakref.ref(scope.kept.model)
        train_dpo(start, data, dpo, TRL, plan, 1, tmp_path / "b", keeper=scope)  # another seed: another init
        assert scope.loads == 2
        gc.collect()
        assert first() is None  # the first model was let go, not kept beside the second
        second = weakref.ref(scope.kept.model)
    gc.collect()
    assert second() is None and scope.kept is None


def test_an_sft_stage_frees_the_kept_dpo_model_before_loading_its_own(tmp_path, yes_no_pairs):
    from dpoflow.base.config import SFTSpec
    from dpoflow.tasks.sft import train_sft

    start, data, _ = yes_no_pairs
    dpo = spec(max_steps=1)
    sft = SFTSpec(max_steps=1, per_device_batch_size=4, gradient_accumulation_steps=1)
    with model_reuse.ModelKeeper() as scope:
        train_dpo(start, data, dpo, TRL, plan_stage(TRL, dpo, start.path), 0, tmp_path / "dpo", keeper=scope)
        kept = weakref.ref(scope.kept.model)
        train_sft(start, data, sft, TRL, plan_stage(TRL, sft, start.path), 0, tmp_path / "sft", keeper=scope)
        assert scope.kept is None
        gc.collect()
        assert kept() is None


def test_without_a_keeper_every_stage_loads_its_own(tmp_path, yes_no_pairs):
    calls = []

    def load():
        calls.append(1)
        return object(), object(), "peft-config"

    assert model_reuse.training_model(None, "k", load)[2] == "peft-config"
    model_reuse.training_model(None, "k", load)
    assert len(calls) == 2


def test_a_stage_given_no_keeper_keeps_nothing_in_another_flows_keeper(tmp_path, yes_no_pairs):
    """Two flows in one process (a worker serving two deployments): a stage uses only the keeper it is
    given, so a model kept by one flow is never taken, reset or freed by the other's stages."""
    start, data, _ = yes_no_pairs
    dpo = spec(max_steps=1)
    plan = plan_stage(TRL, dpo, start.path)
    with model_reuse.ModelKeeper() as mine:
        train_dpo(start, data, dpo, TRL, plan, 0, tmp_path / "mine", keeper=mine)
        kept = mine.kept.model
        train_dpo(start, data, dpo, TRL, plan, 0, tmp_path / "other")  # another flow's stage, no keeper
        assert mine.kept.model is kept and mine.loads == 1 and mine.reuses == 0


def test_restore_undoes_what_training_adds(yes_no_pairs):
    """Adapters, weights, requires_grad, instance forwards and hooks come back as loaded."""
    from dpoflow.engine.backends import choose_backend, load_for_training

    start, _, _ = yes_no_pairs
    dpo = spec()
    model, _, _ = load_for_training(choose_backend(TRL), start.path, plan_stage(TRL, dpo, start.path), dpo.lora,
                                    64, 0)
    kept = model_reuse.Kept("k", model, None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = model.get_base_model()
    model.add_adapter("ref", model.peft_config["default"])
    base.forward = lambda *a, **k: None
    handle = base.get_input_embeddings().register_forward_hook(lambda *a: None)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n and ".default." in n:
                p.add_(1.0)
                p.grad = torch.ones_like(p)
    model.eval()

    kept.restore()
    assert set(model.peft_config) == {"default"} and model.active_adapter == "default"
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], before[n]) and after[n].grad is None for n in before)
    assert all(after[n].requires_grad == ("lora_" in n) for n in before)
    assert "forward" not in base.__dict__
    assert handle.id not in base.get_input_embeddings()._forward_hooks
    assert model.training


@pytest.mark.gpu
def test_on_unsloth_a_variant_on_the_kept_model_equals_one_on_a_fresh_load(tmp_path, yes_no_pairs):
    pytest.importorskip("unsloth")
    start, data, _ = yes_no_pairs
    setup = TrainSetup(backend="unsloth")

    def train_on_gpu(name, keeper=None, **fields):
        dpo = spec(**fields)
        train_dpo(start, data, dpo, setup, plan_stage(setup, dpo, start.path), 0, tmp_path / name, keeper=keeper)
        return load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")

    fresh = train_on_gpu("fresh", beta=0.1)
    with model_reuse.ModelKeeper() as scope:
        train_on_gpu("other", scope, beta=0.5, learning_rate=3e-2)
        reused = train_on_gpu("reused", scope, beta=0.1)
        assert scope.loads == 1 and scope.reuses == 1
    assert all(torch.equal(fresh[k], reused[k]) for k in fresh)


def test_the_kept_model_is_frozen_from_the_collector_only_while_kept(tmp_path, yes_no_pairs):
    """Inside the block what is alive at each stage's start is out of the collector's reach (Unsloth and
    TRL collect several times a stage); the previous stage's garbage is not frozen with it, and leaving
    the block leaves the process frozen as it was."""
    from transformers import TrainerCallback

    start, data, _ = yes_no_pairs
    dpo = spec(max_steps=1)
    plan = plan_stage(TRL, dpo, start.path)
    optimizers = []

    class KeepOptimizer(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            optimizers.append(weakref.ref(optimizer))

    def stage(name, keeper):
        train_dpo(start, data, dpo, TRL, plan, 0, tmp_path / name, callbacks=(KeepOptimizer(),), keeper=keeper)

    was_frozen = gc.get_freeze_count() > 0
    try:
        for frozen_before in (False, True):
            gc.unfreeze()
            if frozen_before:
                gc.freeze()
            with model_reuse.ModelKeeper() as scope:
                stage(f"a{frozen_before}", scope)
                model = weakref.ref(scope.kept.model)
                assert gc.get_freeze_count() > 0
                stage(f"b{frozen_before}", scope)
                gc.collect()
                assert optimizers[-2]() is None  # stage a's trainer: collected, not frozen at b's start
            gc.collect()
            assert model() is None  # frozen while kept, freed on leaving
            assert (gc.get_freeze_count() > 0) == frozen_before
    finally:
        gc.unfreeze()
        if was_frozen:
            gc.freeze()
