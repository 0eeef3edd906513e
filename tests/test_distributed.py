"""Data-parallel training through torchrun on CPU (gloo): the same numbers as one process with the
same effective batch, and a failing rank surfaces as an error with its output."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dpoflow.base.config import DistributedSpec, DPOSpec, SFTSpec, TrainSetup
from dpoflow.engine.distributed import LaunchError, run_stage
from dpoflow.base.hardware import plan_stage
from dpoflow.tasks.dpo import train_dpo
from dpoflow.tasks.sft import train_sft


def _setup(processes: int) -> TrainSetup:
    return TrainSetup(backend="trl", distributed=DistributedSpec(num_processes=processes))


def test_two_processes_train_what_one_process_trains_with_the_same_effective_batch(yes_no_pairs, tmp_path):
    start, data, _ = yes_no_pairs
    # 16 pairs, effective batch 16: every step sees every pair, so the order the ranks draw them in
    # cannot matter and the two runs must agree up to float rounding.
    spec = DPOSpec(learning_rate=1e-2, max_steps=3, per_device_batch_size=8, gradient_accumulation_steps=2,
                   logging_steps=1, lr_scheduler="constant")
    lines: list[str] = []
    results = {}
    for n in (1, 2):
        plan = plan_stage(_setup(n), spec, start.path)
        assert plan.per_device_batch * plan.gradient_accumulation_steps * n == 16
        results[n] = run_stage(train_dpo, n, lines.append, start=start, data=data, spec=spec, setup=_setup(n),
                               plan=plan, seed=0, out_dir=tmp_path / f"out-{n}")
    assert "[rank 0] dpoflow rank 0 of 2: train_dpo" in lines
    assert "[rank 1] dpoflow rank 1 of 2: train_dpo" in lines
    logs = {n: json.loads((tmp_path / f"out-{n}" / "log_history.json").read_text()) for n in (1, 2)}
    losses = {n: [e["loss"] for e in logs[n] if "loss" in e] for n in (1, 2)}
    assert len(losses[2]) == 3 and losses[2][1] < losses[2][0]
    assert losses[2] == pytest.approx(losses[1], abs=1e-5)
    weights = {n: load_file(tmp_path / f"out-{n}" / "adapter" / "adapter_model.safetensors") for n in (1, 2)}
    assert weights[1].keys() == weights[2].keys()
    for name in weights[1]:
        torch.testing.assert_close(weights[2][name], weights[1][name], atol=1e-5, rtol=1e-4)
    assert results[2].metrics["rewards/margins"] == pytest.approx(results[1].metrics["rewards/margins"], abs=1e-5)
    assert not (tmp_path / "out-2-checkpoints").exists()


def test_two_processes_train_on_a_precomputed_reference_s_stored_rows_as_one_does(yes_no_pairs, tmp_path):
    """Every rank reads the reference pass's stored rows (token ids and log-probs) from its artifact."""
    from dpoflow.tasks.dpo import compute_reference_logps

    start, data, _ = yes_no_pairs
    spec = DPOSpec(learning_rate=1e-2, max_steps=3, per_device_batch_size=8, gradient_accumulation_steps=2,
                   logging_steps=1, lr_scheduler="constant", precompute_ref_log_probs=True)
    reference = compute_reference_logps(start, data, spec, _setup(1), plan_stage(_setup(1), spec, start.path), 0,
                                        tmp_path / "reference")
    assert reference.pairs
    losses = {}
    for n in (1, 2):
        run_stage(train_dpo, n, print, start=start, data=data, spec=spec, setup=_setup(n),
                  plan=plan_stage(_setup(n), spec, start.path), seed=0, out_dir=tmp_path / f"out-{n}",
                  reference=reference)
        log = json.loads((tmp_path / f"out-{n}" / "log_history.json").read_text())
        losses[n] = [e["loss"] for e in log if "loss" in e]
    assert len(losses[2]) == 3 and losses[2][-1] < losses[2][0]
    assert losses[2] == pytest.approx(losses[1], abs=1e-5)


def test_sft_on_two_processes_writes_one_merged_model(yes_no_pairs, tmp_path):
    start, data, _ = yes_no_pairs
    spec = SFTSpec(enabled=True, max_steps=2, per_device_batch_size=8, gradient_accumulation_steps=1,
                   logging_steps=1)
    plan = plan_stage(_setup(2), spec, start.path)
    model = run_stage(train_sft, 2, print, base=start, data=data, spec=spec, setup=_setup(2), plan=plan, seed=0,
                      out_dir=tmp_path / "sft")
    assert model.role == "sft" and (tmp_path / "sft" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "sft" / "sft_metrics.json").read_text())["loss"] > 0
    assert not (tmp_path / "sft-scratch").exists()


def test_a_failing_rank_raises_with_its_output(yes_no_pairs, tmp_path):
    start, data, _ = yes_no_pairs
    spec = DPOSpec(max_steps=1, per_device_batch_size=8, gradient_accumulation_steps=1)
    plan = plan_stage(_setup(2), spec, start.path)
    missing = start.model_copy(update={"path": str(tmp_path / "no-such-model")})
    with pytest.raises(LaunchError, match="no-such-model"):
        run_stage(train_dpo, 2, lambda line: None, start=missing, data=data, spec=spec, setup=_setup(2),
                  plan=plan, seed=0, out_dir=tmp_path / "out")


@pytest.mark.parametrize("method", ["orpo", "simpo", "kto"])
def test_the_other_objectives_train_on_two_processes_as_on_one(method, yes_no_pairs, tmp_path):
    """ORPO and SimPO (TRL's CPO trainer, no reference) and KTO (the pairs unpaired, the reference through
    the adapter) through torchrun: with every example in each step, two ranks log one rank's losses (KTO:
    up to how its per-micro-batch mean groups the examples)."""
    start, data, _ = yes_no_pairs
    # KTO sees each pair as two examples: 32, so 16 a rank-step keeps every example in every step.
    batch = 16 if method == "kto" else 8
    spec = DPOSpec(method=method, learning_rate=1e-2, max_steps=3, per_device_batch_size=batch,
                   gradient_accumulation_steps=2, logging_steps=1, lr_scheduler="constant")
    lines: list[str] = []
    losses = {}
    for n in (1, 2):
        plan = plan_stage(_setup(n), spec, start.path)
        run_stage(train_dpo, n, lines.append, start=start, data=data, spec=spec, setup=_setup(n), plan=plan, seed=0,
                  out_dir=tmp_path / f"out-{n}")
        log = json.loads((tmp_path / f"out-{n}" / "log_history.json").read_text())
        losses[n] = [e["loss"] for e in log if "loss" in e]
    assert "[rank 1] dpoflow rank 1 of 2: train_dpo" in lines
    assert len(losses[2]) == 3 and all(math.isfinite(x) for x in losses[2])
    assert losses[2][-1] < losses[2][0]
    # KTO averages its loss within each micro-batch over that micro-batch's examples: one rank with two
    # accumulation steps and two ranks with one group the 32 examples differently (measured 7e-4 apart at
    # step 3); the step-1 loss, where every reward is 0, must agree exactly.
    assert losses[2] == pytest.approx(losses[1], abs=2e-3 if method == "kto" else 1e-4), (losses[1], losses[2])
    assert losses[2][0] == pytest.approx(losses[1][0], abs=1e-6)
    assert (tmp_path / "out-2" / "adapter" / "adapter_model.safetensors").is_file()
