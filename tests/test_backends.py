import pytest
import torch

from dpoflow.engine.backends import BackendError, choose_backend, load_for_training
from dpoflow.base.config import LoraSpec, PipelineConfig, TrainSetup
from dpoflow.base.hardware import TrainingPlan

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")


@no_gpu
def test_auto_falls_back_to_trl_without_a_gpu():
    choice = choose_backend(TrainSetup())
    assert choice.name == "trl" and "no CUDA GPU" in choice.reason


@no_gpu
def test_unsloth_requested_without_a_gpu_is_a_clear_error():
    with pytest.raises(BackendError, match="unsloth needs an NVIDIA GPU"):
        choose_backend(TrainSetup(backend="unsloth"))


def test_quantized_loading_needs_unsloth(tiny_model):
    plan = TrainingPlan(precision="bf16", load_in_4bit=True, per_device_batch=4, gradient_accumulation_steps=1)
    with pytest.raises(BackendError, match="need the unsloth backend"):
        load_for_training(choose_backend(TrainSetup(backend="trl")), str(tiny_model), plan, LoraSpec(), 64, 0)


def test_trl_backend_attaches_a_fresh_seeded_adapter(tiny_model):
    setup = TrainSetup(backend="trl")
    plan = TrainingPlan(precision="fp32", load_in_4bit=False, per_device_batch=4, gradient_accumulation_steps=1)
    loads = [load_for_training(choose_backend(setup), str(tiny_model), plan, LoraSpec(r=4), 64, seed)
             for seed in (0, 0, 1)]
    model, tokenizer, peft_config = loads[0]
    assert peft_config is None and model.peft_config["default"].r == 4
    assert tokenizer.chat_template
    lora_a = [next(p for n, p in m.named_parameters() if "lora_A" in n) for m, _, _ in loads]
    assert (lora_a[0] == lora_a[1]).all() and not (lora_a[0] == lora_a[2]).all()  # seeded init
    assert all(not p.any() for n, p in model.named_parameters() if "lora_B" in n)  # zero effect at start


def test_trl_backend_under_torchrun_leaves_the_wrapping_to_trl(tiny_model, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    plan = TrainingPlan(precision="fp32", load_in_4bit=False, per_device_batch=4, gradient_accumulation_steps=1)
    model, _, peft_config = load_for_training(choose_backend(TrainSetup(backend="trl")), str(tiny_model), plan,
                                              LoraSpec(r=4), 64, 0)
    assert not hasattr(model, "peft_config") and peft_config.r == 4


def test_backend_is_a_config_field():
    config = PipelineConfig(name="x", data={"sources": ["a"]}, train={"backend": "trl"})
    assert config.train.backend == "trl"


@pytest.mark.gpu
def test_unsloth_dpo_on_gpu_starts_at_ln2(tmp_path, yes_no_pairs):
    """On a GPU with the gpu extra: the dpo stage trains through Unsloth and step 1 has policy ==
    reference (loss ln 2)."""
    pytest.importorskip("unsloth")
    import json
    import math

    from dpoflow.base.config import DPOSpec
    from dpoflow.base.hardware import plan_stage
    from dpoflow.tasks.dpo import train_dpo

    start, data, _ = yes_no_pairs
    spec = DPOSpec(max_steps=2, per_device_batch_size=4, gradient_accumulation_steps=1, logging_steps=1)
    setup = TrainSetup(backend="unsloth")
    adapter = train_dpo(start, data, spec, setup, plan_stage(setup, spec, start.path), 0, tmp_path / "out")
    log = json.loads((tmp_path / "out" / "log_history.json").read_text())
    assert math.isclose(log[0]["loss"], math.log(2), abs_tol=1e-3)
    assert "[unsloth;" in adapter.reference


@pytest.mark.gpu
def test_unsloth_reference_logps_equal_the_start_model(tmp_path, yes_no_pairs, tiny_model):
    """Unsloth backend: the reference log-probs the trainer uses (TRL's computation on the patched
    model with the frozen fresh "ref" adapter) equal the start model's own, computed by plain
    transformers in float32, within bf16 rounding."""
    pytest.importorskip("unsloth")
    from dpoflow.base.artifacts import read_jsonl_rows
    from dpoflow.base.config import DPOSpec
    from dpoflow.base.hardware import plan_stage
    from dpoflow.engine.models import load_model, load_tokenizer
    from dpoflow.engine.scoring import completion_logps
    from dpoflow.tasks.dpo import compute_reference_logps

    start, data, rows = yes_no_pairs
    setup = TrainSetup(backend="unsloth", precision="bf16", quantize="none")
    spec = DPOSpec(per_device_batch_size=4, gradient_accumulation_steps=1)
    reference = compute_reference_logps(start, data, spec, setup, plan_stage(setup, spec, start.path), 0,
                                        tmp_path / "ref")
    stored = read_jsonl_rows(reference.file)
    tok = load_tokenizer(str(tiny_model))
    model = load_model(str(tiny_model), "float32").cuda()
    prompts = [r["prompt"] for r in rows]
    for field in ("chosen", "rejected"):
        intended = completion_logps(model, tok, prompts, [r[field] for r in rows])
        got = torch.tensor([r[f"ref_{field}_logps"] for r in stored])
        assert torch.allclose(got, intended, rtol=0.02, atol=0.1), (field, got[:4], intended[:4])


def test_several_processes_train_through_trl_and_unsloth_is_refused_there():
    two = {"num_processes": 2}
    choice = choose_backend(TrainSetup(distributed=two))
    assert choice.name == "trl" and "torchrun" in choice.reason
    with pytest.raises(BackendError, match="unsloth with distributed.num_processes 2 is not supported"):
        choose_backend(TrainSetup(backend="unsloth", distributed=two))


def test_compile_caches_go_to_the_dpoflow_cache_unless_set(monkeypatch, tmp_path):
    from dpoflow.engine.backends import keep_compile_caches

    monkeypatch.setenv("DPOFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", "/mine")
    keep_compile_caches()
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == "/mine"
