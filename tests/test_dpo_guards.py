"""The dpo stage's guards on CPU: non-finite numbers stop it, a forced collapse is retried from the
last good checkpoint with the learning rate halved, and a killed run resumes from its checkpoint."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dpoflow.base.config import DataSpec, DPOSpec, GuardSpec, SFTSpec, TrainSetup
from dpoflow.base.hardware import plan_stage
from dpoflow.base.records import ModelRef
from dpoflow.tasks.dpo import CollapseError, NonFiniteLoss, train_dpo

TRL = TrainSetup(backend="trl")


def test_non_finite_numbers_stop_the_stage_and_keep_checkpoints(tmp_path, yes_no_pairs):
    import torch
    from transformers import TrainerCallback

    class Diverge(TrainerCallback):
        """From step 5 on, the trained adapter holds an inf: what a diverging run looks like."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 5:
                lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
                with torch.no_grad():
                    lora_b.fill_(float("inf"))

    start, data, _ = yes_no_pairs
    spec = DPOSpec(learning_rate=1e-3, max_steps=30, per_device_batch_size=4, gradient_accumulation_steps=1,
                   logging_steps=1, lr_scheduler="constant", guards=GuardSpec(checkpoint_steps=2))
    with pytest.raises(NonFiniteLoss, match=r"became non-finite at step 6.*Last good checkpoint: .*checkpoint-4 "):
        train_dpo(start, data, spec, TRL, plan_stage(TRL, spec, start.path), 0, tmp_path / "out", tmp_path / "ckpt",
                  callbacks=(Diverge(),))
    kept = sorted(p.name for p in (tmp_path / "ckpt" / "attempt-0").glob("checkpoint-*"))
    assert kept == ["checkpoint-2", "checkpoint-4"]  # the diverged state is never saved
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def sft_start(repo, tmp_path_factory):
    """A model that already knows the demo task a little: DPO at an absurd lr drags it back to noise."""
    from dpoflow.tasks.prepare import prepare_data
    from dpoflow.tasks.sft import train_sft
    from dpoflow.engine.tiny import build_tiny_model

    tmp = tmp_path_factory.mktemp("sft_start")
    base = ModelRef(path=str(build_tiny_model("tiny-llama", tmp / "base")), digest="b", source="tiny", role="base")
    source = str(repo / "data" / "demo" / "sentiment.jsonl")
    data = prepare_data([source], DataSpec(sources=[source]), base, tmp / "data")
    spec = SFTSpec(learning_rate=2e-3, epochs=1, per_device_batch_size=8, gradient_accumulation_steps=1,
                   max_length=128)
    return train_sft(base, data, spec, TRL, plan_stage(TRL, spec, base.path), 0, tmp / "sft"), data


def test_forced_collapse_is_retried_from_the_last_good_checkpoint_with_lr_halved(tmp_path, sft_start):
    start, data = sft_start
    guards = GuardSpec(checkpoint_steps=2, max_chosen_logp_drop_per_token=1.0, collapse_patience=2, max_retries=3)
    spec = DPOSpec(learning_rate=1e-2, max_steps=24, per_device_batch_size=8, gradient_accumulation_steps=1,
                   logging_steps=2, lr_scheduler="constant", max_length=128, guards=guards)
    try:
        adapter = train_dpo(start, data, spec, TRL, plan_stage(TRL, spec, start.path), 0, tmp_path / "out",
                            tmp_path / "ckpt")
        retries = adapter.retries
        assert adapter.metrics["retries"] == len(retries) >= 1
        assert adapter.metrics["final_learning_rate"] == pytest.approx(1e-2 / 2 ** len(retries))
        assert json.loads((tmp_path / "out" / "retries.json").read_text()) == retries
        assert not (tmp_path / "ckpt").exists()  # checkpoints are removed once the stage succeeds
    except CollapseError as e:
        assert "after 3 retries" in str(e)
        retries = json.loads((tmp_path / "ckpt" / "attempt.json").read_text())["retries"]
    first = retries[0]
    assert first["attempt"] == 0 and first["learning_rate"] == 1e-2 and first["drop_per_token"] > 1.0
    assert first["restart_from"] == "start" or Path(first["restart_from"]).name.startswith("checkpoint-")
    assert [r["learning_rate"] for r in retries] == [1e-2 / 2 ** i for i in range(len(retries))]


KILLABLE = textwrap.dedent("""
    import os, sys, time
    os.environ["OMP_NUM_THREADS"] = "1"
    from pathlib import Path
    from transformers import TrainerCallback
    from dpoflow.base.config import DPOSpec, GuardSpec, TrainSetup
    from dpoflow.base.hardware import plan_stage
    from dpoflow.base.records import ModelRef, PreparedData
    from dpoflow.tasks.dpo import train_dpo

    class Slow(TrainerCallback):  # gives the test time to kill the process between checkpoints
        steps_run = 0

        def on_step_end(self, *a, **k):
            Slow.steps_run += 1
            time.sleep(float(os.environ.get("STEP_SLEEP", "0")))

    model, train, work = sys.argv[1:4]
    start = ModelRef(path=model, digest="t", source="tiny", role="base")
    data = PreparedData(path=work, digest="t", train=train, heldout="", rejected="", counts={})
    spec = DPOSpec(learning_rate=1e-3, max_steps=10, per_device_batch_size=4, gradient_accumulation_steps=1,
                   logging_steps=1, lr_scheduler="constant", guards=GuardSpec(checkpoint_steps=2))
    setup = TrainSetup(backend="trl")
    adapter = train_dpo(start, data, spec, setup, plan_stage(setup, spec, model), 0, Path(work) / "out",
                        Path(work) / "ckpt", callbacks=(Slow(),))
    print("STEPS_RUN", Slow.steps_run)
""")


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, yes_no_pairs, tiny_model):
    _, data, _ = yes_no_pairs
    script = tmp_path / "train.py"
    script.write_text(KILLABLE)
    args = [sys.executable, str(script), str(tiny_model), data.train, str(tmp_path)]
    env = {**os.environ, "STEP_SLEEP": "0.4"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    attempt = tmp_path / "ckpt" / "attempt-0"
    deadline = time.time() + 120
    while not (attempt / "checkpoint-4" / "manifest.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out").exists()
    saved = max(int(p.name.split("-")[1]) for p in attempt.glob("checkpoint-*")
                if (p / "manifest.json").exists())

    resumed = subprocess.run(args, env={**os.environ, "STEP_SLEEP": "0"}, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    log = json.loads((tmp_path / "out" / "log_history.json").read_text())
    steps = [e["step"] for e in log if "loss" in e]
    assert steps == list(range(1, 11))  # steps before the kill come from the checkpoint's state
    assert f"STEPS_RUN {10 - saved}" in resumed.stdout  # only the steps after that checkpoint ran again
    assert not (tmp_path / "ckpt").exists()


def _crash_at(step: int, error: BaseException):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise error

    return Crash()


RESUMABLE = DPOSpec(learning_rate=1e-3, max_steps=10, per_device_batch_size=4, gradient_accumulation_steps=1,
                    logging_steps=1, lr_scheduler="constant", guards=GuardSpec(checkpoint_steps=2, keep_checkpoints=2))


def _adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("damage", ["optimizer cut in half", "save cut short"])
def test_a_resumed_stage_restores_the_saved_weights_and_skips_a_damaged_newest_checkpoint(
        tmp_path, yes_no_pairs, capsys, damage):
    start, data, _ = yes_no_pairs
    plan = plan_stage(TRL, RESUMABLE, start.path)
    whole = train_dpo(start, data, RESUMABLE, TRL, plan, 0, tmp_path / "whole", tmp_path / "whole-ckpt")

    with pytest.raises(RuntimeError, match="crash"):
        train_dpo(start, data, RESUMABLE, TRL, plan, 0, tmp_path / "out", tmp_path / "ckpt",
                  callbacks=(_crash_at(7, RuntimeError("crash")),))
    attempt = tmp_path / "ckpt" / "attempt-0"
    assert sorted(p.name for p in attempt.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]  # 2 kept
    newest = attempt / "checkpoint-6"
    if damage == "optimizer cut in half":
        optimizer = newest / "optimizer.pt"
        optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    else:  # killed while saving: every file may be there, but the manifest is written last
        (newest / "manifest.json").unlink()
    capsys.readouterr()

    resumed = train_dpo(start, data, RESUMABLE, TRL, plan, 0, tmp_path / "out", tmp_path / "ckpt")
    out = capsys.readouterr().out
    assert "dpo: resuming from" in out and "checkpoint-4 (step 4)" in out
    if damage == "optimizer cut in half":
        assert f"checkpoint {newest} is damaged" in out and "resuming from checkpoint-4 instead" in out
    log = json.loads((tmp_path / "out" / "log_history.json").read_text())
    assert [e["step"] for e in log if "loss" in e] == list(range(1, 11))
    assert resumed.metrics["loss"] == pytest.approx(whole.metrics["loss"], abs=1e-5)
    trained, expected = _adapter(tmp_path / "out"), _adapter(tmp_path / "whole")
    assert trained.keys() == expected.keys()
    for name, weight in expected.items():
        assert (trained[name] - weight).abs().max().item() < 1e-6, name
    # Trained weights, not the fresh adapter (whose lora_B is zero) trained for fewer steps.
    assert any(w.abs().max().item() > 0 for n, w in expected.items() if "lora_B" in n)


def test_ctrl_c_in_training_names_the_step_and_the_checkpoint_kept(tmp_path, yes_no_pairs):
    from dpoflow.base.runtime import StageInterrupted

    start, data, _ = yes_no_pairs
    plan = plan_stage(TRL, RESUMABLE, start.path)
    with pytest.raises(StageInterrupted, match=r"^dpo at step 5; checkpoint kept: .*attempt-0/checkpoint-4$"):
        train_dpo(start, data, RESUMABLE, TRL, plan, 0, tmp_path / "out", tmp_path / "ckpt",
                  callbacks=(_crash_at(5, KeyboardInterrupt()),))


def test_ctrl_c_in_any_stage_names_the_stage():
    from dpoflow.base.runtime import StageInterrupted
    from dpoflow.tasks import stage_task

    @stage_task
    def sft_task(out_dir: str):
        raise KeyboardInterrupt

    with pytest.raises(StageInterrupted, match="^sft$"):
        getattr(sft_task, "fn", sft_task)(out_dir="x")
