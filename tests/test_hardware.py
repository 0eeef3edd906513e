import pytest

from dpoflow.base.hardware import (GiB, GpuFacts, count_parameters, describe, estimate_training_bytes, model_shape,
                              plan_training)

# Llama-3.1-8B: the shape the seed recipe targets.
N_8B = 8_030_261_248
SHAPE_8B = dict(hidden_size=4096, num_hidden_layers=32, vocab_size=128256)
H100 = GpuFacts("NVIDIA H100 80GB HBM3", (9, 0), 80 * GiB, 79 * GiB, True)
RTX_3090 = GpuFacts("NVIDIA GeForce RTX 3090", (8, 6), 24 * GiB, 23 * GiB, True)
T4 = GpuFacts("Tesla T4", (7, 5), 16 * GiB, 15 * GiB, False)


def plan(gpu, precision="auto", quantize="auto", seq_len=1024, batch=4, effective=32, n=N_8B, shape=SHAPE_8B,
         backend="trl", **kwargs):
    return plan_training(gpu, precision, quantize, n, shape, seq_len, batch, effective, backend=backend, **kwargs)


def test_h100_trains_8b_in_bf16_without_4bit_and_mentions_fp8():
    p = plan(H100)
    assert (p.precision, p.load_in_4bit, p.per_device_batch, p.gradient_accumulation_steps) == ("bf16", False, 8, 4)
    assert any("FP8" in r and "precision: fp8" in r for r in p.reasons)
    assert any("no 4-bit" in r for r in p.reasons)
    assert not p.warnings


def test_24gib_card_loads_8b_in_4bit():
    p = plan(RTX_3090)
    assert (p.precision, p.load_in_4bit, p.per_device_batch) == ("bf16", True, 4)
    assert any("4-bit" in r for r in p.reasons)
    assert not any("FP8" in r for r in p.reasons)  # compute capability 8.6 has no FP8


def test_quantize_none_halves_the_batch_instead():
    p = plan(RTX_3090, quantize="none")
    assert not p.load_in_4bit and p.per_device_batch < 4
    assert p.per_device_batch * p.gradient_accumulation_steps == 32


def test_nothing_fits_gives_batch_1_and_a_warning():
    tiny_card = GpuFacts("small", (8, 6), 4 * GiB, 4 * GiB, True)
    p = plan(tiny_card)
    assert p.load_in_4bit and p.per_device_batch == 1 and p.gradient_accumulation_steps == 32
    assert any("out-of-memory" in w for w in p.warnings)


def test_fp8_needs_compute_capability_8_9():
    with pytest.raises(ValueError, match="8.6"):
        plan(RTX_3090, precision="fp8")
    p = plan(H100, precision="fp8")
    assert p.precision == "fp8" and not p.load_in_4bit
    assert any("UNSLOTH_COMPILE_DISABLE=1" in w for w in p.warnings)


def test_card_without_bf16_trains_fp16_with_a_nan_warning():
    p = plan(T4, seq_len=256, batch=1, n=1_000_000_000, shape=dict(hidden_size=2048, num_hidden_layers=16,
                                                                    vocab_size=32000))
    assert p.precision == "fp16"
    assert any("NaN" in w for w in p.warnings)
    with pytest.raises(ValueError, match="no bf16"):
        plan(T4, precision="bf16")


def test_no_gpu_is_fp32_on_cpu():
    p = plan(None)
    assert (p.precision, p.load_in_4bit) == ("fp32", False)
    assert any("CPU" in r for r in p.reasons)
    with pytest.raises(ValueError):
        plan(None, quantize="4bit")


@pytest.mark.parametrize("batch, effective, steps", [(4, 32, 8), (4, 8, 2), (3, 32, 11), (8, 4, 1), (1, 1, 1)])
def test_gradient_accumulation_arithmetic(batch, effective, steps):
    p = plan(None, batch=batch, effective=effective)
    assert p.gradient_accumulation_steps == steps
    assert f"per-device batch {batch}, effective batch {effective}: gradient accumulation {steps}" in p.reasons
    assert bool(p.warnings) == (batch * steps != effective)


def test_estimate_grows_with_weights_batch_and_no_checkpointing():
    args = (N_8B, 4096, 32, 128256)
    base = estimate_training_bytes(*args, 4, 512, "bf16")
    assert estimate_training_bytes(*args, 4, 512, "4bit") < base < estimate_training_bytes(*args, 8, 512, "bf16")
    assert base < estimate_training_bytes(*args, 4, 512, "bf16", gradient_checkpointing=False)
    assert estimate_training_bytes(*args, 4, 512, "fp8") < base
    with pytest.raises(ValueError, match="backend 'vllm'"):
        estimate_training_bytes(*args, 4, 512, "bf16", backend="vllm")


@pytest.mark.parametrize("backend, pairs, weights, checkpointing, measured_gib", [
    ("trl", 4, "bf16", True, 17.80),  # TRL + PEFT, ref_model=None
    ("unsloth", 8, "bf16", True, 17.59),  # Unsloth alone (dpoflow's stage: 16.56)
    ("unsloth", 16, "bf16", True, 19.62),
    ("unsloth", 8, "bf16", False, 45.43),  # Unsloth alone (dpoflow's stage: 36.53)
    ("unsloth", 4, "4bit", True, 7.2),
])
def test_estimate_errs_high_but_near_the_measured_peaks(backend, pairs, weights, checkpointing, measured_gib):
    """docs/benchmarks.md's peaks, 8B shape, 512-token sequences: the estimate must not plan an OOM (above
    the peak) and must not waste a 24 GiB card (within 25% of it)."""
    estimate = estimate_training_bytes(N_8B, 4096, 32, 128256, pairs, 512, weights, checkpointing, backend) / GiB
    assert measured_gib < estimate < 1.25 * measured_gib


def test_count_parameters_reads_headers_only(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert count_parameters(tiny_model) == sum(p.numel() for p in model.parameters())
    shape = model_shape(tiny_model)
    assert shape == dict(hidden_size=model.config.hidden_size, num_hidden_layers=model.config.num_hidden_layers,
                         vocab_size=model.config.vocab_size)


def test_describe_lists_decisions():
    text = describe(plan(H100, seq_len=512))
    assert "precision:" in text and "bf16" in text and "gradient accumulation 4" in text


def test_doctor_prints_backend_and_plan(repo, capsys):
    from dpoflow.app.cli import main

    assert main(["doctor", "demo", "-f", str(repo / "pipelines.yaml")]) == 0
    out = capsys.readouterr().out
    assert "backend" in out and "torch" in out and "precision:" in out


TWO_H100 = GpuFacts("NVIDIA H100 80GB HBM3", (9, 0), 80 * GiB, 79 * GiB, True, count=2)


@pytest.mark.parametrize("gpu", [None, TWO_H100], ids=["cpu", "two-h100"])
def test_doctor_prints_the_plans_the_pipeline_trains_with(repo, capsys, monkeypatch, tiny_model, gpu):
    """Doctor plans every training stage as the run does (distributed.* and grow_batch included): its
    printed plans are the pipeline's own plan function's, for sft and dpo."""
    from textwrap import indent

    from dpoflow.app.cli import main
    from dpoflow.base.config import load_pipeline
    from dpoflow.flows.pipeline import hardware_plans
    from dpoflow.base.records import ModelRef

    monkeypatch.setattr("dpoflow.base.hardware.detect_gpu", lambda: gpu)
    overrides = ["train.distributed.num_processes=2", "train.grow_batch=false"]
    assert main(["doctor", "demo", "-f", str(repo / "pipelines.yaml"),
                 *[arg for item in overrides for arg in ("--set", item)]]) == 0
    out = capsys.readouterr().out
    config = load_pipeline("demo", repo / "pipelines.yaml", overrides)
    base = ModelRef(path=str(tiny_model), digest="-", source=config.model.source, role="base")
    for stage, spec in (("sft", config.sft), ("dpo", config.dpo)):
        plan = hardware_plans(config, "trl")(spec, base)
        assert plan.num_processes == 2
        assert f"plan for the {stage} stage" in out and indent(describe(plan), "  ") in out, out


def test_doctor_skips_the_plan_of_a_model_only_the_run_converts_and_names_a_folder_that_is_no_model(
        repo, capsys, tmp_path):
    from dpoflow.app.cli import main

    assert main(["doctor", "demo-real", "-f", str(repo / "pipelines.yaml")]) == 0  # model: pypi:gemma3-270m
    assert "plan:     skipped: pypi:gemma3-270m is a package the model stage converts" in capsys.readouterr().out
    assert main(["doctor", "demo", "-f", str(repo / "pipelines.yaml"), "--set", f"model.source={tmp_path}"]) == 1
    assert f"! model: {tmp_path}: no *.safetensors files" in capsys.readouterr().out


def test_doctor_names_what_would_fail_a_run_before_it_starts(repo, capsys, monkeypatch, tmp_path):
    """Problems a run would hit only after training (GGUF tools missing for the export), or at its first
    step (no bf16 for precision bf16, an unwritable compile cache): doctor names each and exits 1."""
    from dpoflow.engine import ggufexport
    from dpoflow.app.cli import main

    demo = ["doctor", "demo", "-f", str(repo / "pipelines.yaml")]
    monkeypatch.setattr(ggufexport, "missing_tools", lambda: ["llama-cpp-python"])
    assert main([*demo, "--set", "export.formats=[adapter,gguf]"]) == 1
    out = capsys.readouterr().out
    assert "! export.formats has gguf but llama-cpp-python is not installed" in out
    assert main(demo) == 0  # no gguf in the demo's formats: nothing missing
    capsys.readouterr()

    t4 = GpuFacts("Tesla T4", (7, 5), 15 * GiB, 14 * GiB, False)
    monkeypatch.setattr("dpoflow.base.hardware.detect_gpu", lambda: t4)
    assert main([*demo, "--set", "train.precision=bf16"]) == 1
    assert "! training plan: precision bf16: Tesla T4 (compute capability 7.5) has no bf16" in capsys.readouterr().out
    assert main(demo) == 0  # auto: fp16 with a warning, which is not a failure
    assert "warning:  Tesla T4 has no bf16" in capsys.readouterr().out

    from dpoflow.app.doctor import preflight_problems
    from dpoflow.base.config import load_pipeline

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("DPOFLOW_CACHE_DIR", str(blocked))  # a file: no folder can be made under it
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    config = load_pipeline("demo", repo / "pipelines.yaml", [])
    problems = preflight_problems(config, "unsloth", None)
    assert any(f"compile cache folder {blocked}/compile/inductor is not writable" in p for p in problems)
    assert preflight_problems(config, "trl", None) == []  # TRL compiles nothing


def test_processes_share_the_effective_batch_and_need_that_many_gpus():
    two_h100 = GpuFacts("NVIDIA H100 80GB HBM3", (9, 0), 80 * GiB, 79 * GiB, True, count=2)
    p = plan_training(two_h100, "auto", "auto", N_8B, SHAPE_8B, 512, 4, 32, num_processes=2)
    assert (p.per_device_batch, p.gradient_accumulation_steps, p.num_processes) == (8, 2, 2)  # grown from 4
    assert any("2 of 2 GPUs, DDP through torchrun" in r for r in p.reasons)
    small = plan_training(None, "auto", "auto", N_8B, SHAPE_8B, 512, 8, 8, num_processes=2)
    assert (small.per_device_batch, small.gradient_accumulation_steps) == (4, 1) and not small.warnings
    with pytest.raises(ValueError, match="needs 4 GPUs; 2 visible"):
        plan_training(two_h100, "auto", "auto", N_8B, SHAPE_8B, 512, 4, 32, num_processes=4)
    with pytest.raises(ValueError, match="fsdp needs CUDA"):
        plan_training(None, "auto", "auto", N_8B, SHAPE_8B, 512, 4, 32, num_processes=2, strategy="fsdp")


def test_batch_grows_only_where_memory_and_the_effective_batch_allow():
    grown = plan(H100)
    assert (grown.per_device_batch, grown.gradient_accumulation_steps, grown.gradient_checkpointing) == (8, 4, True)
    assert any("batch raised from 4" in r and "with checkpointing" in r for r in grown.reasons)
    # without recomputation the micro-batch grows on to 16 where that fits (8B on an H200), with it to 8
    roomy = plan(H200, seq_len=512, backend="unsloth")
    assert (roomy.per_device_batch, roomy.gradient_accumulation_steps, roomy.gradient_checkpointing) == (16, 2, False)
    assert any("batch raised from 8" in r and "without checkpointing" in r for r in roomy.reasons)
    assert plan(H200, seq_len=512, gradient_checkpointing=True).per_device_batch == 8
    assert plan(H100, seq_len=512).per_device_batch == 8  # 16 pairs without recomputation do not fit
    kept = plan_training(H100, "auto", "auto", N_8B, SHAPE_8B, 1024, 4, 32, grow_batch=False)
    assert (kept.per_device_batch, kept.gradient_accumulation_steps) == (4, 8)
    assert plan(H100, effective=4).per_device_batch == 4  # nothing to trade: no accumulation to cut
    assert plan(H100, effective=12).per_device_batch == 4  # 8 does not divide 12
    assert plan(RTX_3090).per_device_batch == 4  # 8 pairs would not fit
    assert plan(None).per_device_batch == 4  # CPU: as configured


H200 = GpuFacts("NVIDIA H200", (9, 0), 141 * GiB, 139 * GiB, True)


def test_checkpointing_is_off_only_where_memory_allows_without_it():
    # 8B, 8 pairs of 1,024 tokens: ~99 GiB estimated without recomputation
    big = plan(H200)
    assert (big.per_device_batch, big.gradient_checkpointing) == (8, False)
    assert any("checkpointing off" in r for r in big.reasons)
    assert "grad checkpointing: off" in describe(big)
    # 4 pairs fit an H100 without recomputation, 8 only with it: the doubled batch (as fast, half the memory)
    tight = plan(H100)
    assert (tight.per_device_batch, tight.gradient_checkpointing) == (8, True)
    assert any("checkpointing on" in r for r in tight.reasons)
    assert plan(H100, seq_len=512).gradient_checkpointing is False  # half the activations fit an H100
    assert plan(RTX_3090).gradient_checkpointing is True


def test_checkpointing_asked_for_is_kept_and_cpu_keeps_it_off():
    asked = plan_training(H200, "auto", "auto", N_8B, SHAPE_8B, 1024, 4, 32, gradient_checkpointing=True)
    assert asked.gradient_checkpointing is True and any("train's gradient_checkpointing" in r for r in asked.reasons)
    assert plan_training(RTX_3090, "auto", "auto", N_8B, SHAPE_8B, 1024, 4, 32,
                         gradient_checkpointing=False).gradient_checkpointing is False
    # off as asked: the batch grows only as far as it fits without recomputation (8 would fit only with it)
    assert plan(H100, gradient_checkpointing=False).per_device_batch == 4
    assert plan(None).gradient_checkpointing is False


def test_a_memory_budget_plans_as_on_a_card_that_size():
    budget = plan_training(H200, "auto", "auto", N_8B, SHAPE_8B, 1024, 4, 32, memory_budget_gib=23)
    card = plan(RTX_3090)
    assert (budget.load_in_4bit, budget.per_device_batch, budget.gradient_checkpointing) == \
        (card.load_in_4bit, card.per_device_batch, card.gradient_checkpointing) == (True, 4, True)
    assert any("memory_budget_gib 23" in r for r in budget.reasons)
    # a budget above what is free changes nothing
    roomy = plan_training(RTX_3090, "auto", "auto", N_8B, SHAPE_8B, 1024, 4, 32, memory_budget_gib=500)
    assert (roomy.load_in_4bit, roomy.per_device_batch) == (card.load_in_4bit, card.per_device_batch)
    assert not any("memory_budget_gib" in r for r in roomy.reasons)


def test_unsloth_offloads_checkpoints_so_a_24gib_budget_trains_8b_in_bf16_at_8_pairs():
    """Unsloth keeps the checkpointed layer inputs in CPU memory and bf16 logits: the 24 GiB profile
    (docs/benchmarks.md: 16.6 GiB measured at 8 pairs) needs no 4-bit and takes 8 pairs a micro-batch."""
    p = plan(H200, seq_len=512, backend="unsloth", memory_budget_gib=24)
    assert (p.load_in_4bit, p.per_device_batch, p.gradient_checkpointing) == (False, 8, True)
    four = plan(H200, "auto", "4bit", seq_len=512, backend="unsloth", memory_budget_gib=24)
    assert (four.load_in_4bit, four.per_device_batch, four.gradient_checkpointing) == (True, 8, True)
    # TRL keeps them on the GPU: the same budget fits 4 pairs
    assert plan(H200, seq_len=512, memory_budget_gib=24).per_device_batch == 4
