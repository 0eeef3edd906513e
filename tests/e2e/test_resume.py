"""A `dpoflow run` killed mid-DPO (SIGKILL, or Ctrl-C) and run again continues exactly where its last
intact checkpoint left off: the same losses and, at the end, the same adapter as a run never
interrupted. Ctrl-C stops the command within seconds with one line saying how to resume, and no
process of the command (Prefect's temporary server) outlives it either way."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import descendants, still_alive_after

pytestmark = pytest.mark.slow

KILL_AFTER = 10  # kill once checkpoint-10 (or later) is sealed
# Per backend: optimizer steps of the run (the GPU's are fast: enough to be stopped mid-way), and how
# close the resumed run must come to the uninterrupted one. On the CPU two runs compute the same float32
# numbers: the losses agree to `loss_tol` and the final adapters to `adapter_tol`, weight by weight. On a
# GPU, bf16 kernels of two processes differ in the last bits; the losses still agree step by step, but
# the weights do not: where a LoRA factor's gradient is near zero (lora_A while lora_B is still small),
# Adam's normalised steps turn that noise into a random walk of about the learning rate a step (lora_A
# tensors 0.04 to 0.86 of their norm apart after 200 steps at 1e-2, seen on an H200 in runs whose every
# loss agreed). There the losses are the check, every step after the resume, and the weights are not
# compared (`adapter_tol` None).
BACKENDS = {
    "trl": dict(steps=40, lr=2e-3, loss_tol=1e-4, adapter_tol=1e-5),
    # bf16 moves the tiny model more slowly: a larger rate takes the loss well away from ln 2 by step 10.
    # A warm GPU takes ~0.1 s a step: enough steps that the run is still going when it is stopped.
    "unsloth": dict(steps=200, lr=1e-2, loss_tol=2e-3, adapter_tol=None),
}

PIPELINE = """
pipelines:
  resume:
    cpu_threads: 1
    model: {{source: "builtin:tiny-llama"}}
    train: {{backend: {backend}}}
    data: {{sources: ["{data}"], heldout_fraction: 0.12, decontamination: {{ngram: 16}}}}
    dpo:
      learning_rate: {lr}
      max_steps: {steps}
      per_device_batch_size: 4
      gradient_accumulation_steps: 1
      logging_steps: 1
      lr_scheduler: constant
      max_length: 128
      guards: {{checkpoint_steps: 2, keep_checkpoints: 2}}
    evaluate: {{enabled: false}}
    export: {{formats: [adapter]}}
"""


class Run:
    """One `dpoflow run resume` in a workdir of its own, started in its own session as a terminal
    starts a command (so Ctrl-C can go to its whole process group)."""

    def __init__(self, tmp: Path, repo: Path, name: str, backend: str):
        self.work, self.name = tmp / name, name
        self.file = tmp / "pipelines.yaml"
        if not self.file.exists():
            data = repo / "data" / "demo" / "sentiment.jsonl"
            spec = BACKENDS[backend]
            self.file.write_text(PIPELINE.format(data=data, steps=spec["steps"], lr=spec["lr"], backend=backend))
        (self.work / "prefect").mkdir(parents=True)
        self.env = {**os.environ, "PREFECT_HOME": str(self.work / "prefect"), "OMP_NUM_THREADS": "1",
                    "UNSLOTH_COMPILE_LOCATION": str(self.work / "unsloth_compiled_cache")}
        self.env.pop("PREFECT_API_URL", None)
        self.tries = 0

    def start(self) -> "Run":
        self.tries += 1
        self.log = self.work.parent / f"{self.name}-{self.tries}.log"
        cmd = [sys.executable, "-m", "dpoflow", "run", "resume", "-f", str(self.file),
               "--set", f"workdir={self.work}"]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def output(self) -> str:
        return self.log.read_text()

    def finish(self, expect: int = 0) -> dict:
        assert self.proc.wait(timeout=300) == expect, self.output()[-5000:]
        if expect:
            return {}
        run_dir = next(line.split(":", 1)[1].strip() for line in self.output().splitlines()
                       if line.startswith("run folder:"))
        dpo = Path(run_dir) / "dpo"
        from safetensors.torch import load_file

        history = [e for e in json.loads((dpo / "log_history.json").read_text()) if "loss" in e]
        return {"losses": {e["step"]: e["loss"] for e in history},
                "rewards": {e["step"]: (e["rewards/chosen"], e["rewards/rejected"]) for e in history},
                "adapter": load_file(dpo / "adapter" / "adapter_model.safetensors")}

    def sealed_checkpoints(self) -> list[int]:
        found = self.work.glob("checkpoints/dpo/*/attempt-0/checkpoint-*/manifest.json")
        return sorted(int(p.parent.name.split("-")[1]) for p in found)

    def reached(self, step: int, deadline: float) -> bool:
        """Whether a checkpoint at `step` or later is sealed, while the run still runs."""
        assert self.proc.poll() is None, "the run ended before it could be stopped:\n" + self.output()[-3000:]
        assert time.time() < deadline, self.output()[-3000:]
        return any(s >= step for s in self.sealed_checkpoints())


def _assert_continues(resumed: dict, uninterrupted: dict, output: str, steps: int, lr: float, loss_tol: float,
                      adapter_tol: float | None) -> None:
    step = int(output.split("dpo: resuming from ")[1].split("(step ")[1].split(")")[0])
    assert 0 < step < steps
    # The first step trained after the resume. A fresh adapter (the policy equal to the reference) would
    # give both rewards exactly 0 there; the uninterrupted run's are well away from 0, so resumed rewards
    # within the tolerance of the uninterrupted ones cannot be a fresh adapter's. (The loss is no such
    # witness: on the GPU the tiny model's loss stays within 0.01 of ln 2 for dozens of steps.)
    first = step + 1
    assert sum(map(abs, uninterrupted["rewards"][first])) > 10 * loss_tol, uninterrupted["rewards"][first]
    assert resumed["rewards"][first] == pytest.approx(uninterrupted["rewards"][first], abs=loss_tol)
    for k in range(first, min(step + 4, steps + 1)):
        assert resumed["losses"][k] == pytest.approx(uninterrupted["losses"][k], abs=(k - step) * loss_tol), k
    assert list(resumed["losses"]) == list(range(1, steps + 1))
    for later in range(step + 1, steps + 1):  # and every step after it
        assert resumed["losses"][later] == pytest.approx(uninterrupted["losses"][later], abs=5 * loss_tol), later
    assert resumed["adapter"].keys() == uninterrupted["adapter"].keys()
    if adapter_tol is not None:
        for name, weight in uninterrupted["adapter"].items():
            assert (resumed["adapter"][name].float() - weight.float()).abs().max().item() < adapter_tol, name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process trees from /proc")
@pytest.mark.parametrize("backend", ["trl", pytest.param("unsloth", marks=pytest.mark.gpu)])
def test_a_run_killed_or_interrupted_mid_dpo_resumes_exactly_where_it_stopped(repo, tmp_path, backend):
    if backend == "unsloth":
        pytest.importorskip("unsloth")
    whole = Run(tmp_path, repo, "whole", backend).start()
    killed = Run(tmp_path, repo, "killed", backend).start()
    interrupted = Run(tmp_path, repo, "interrupted", backend).start()

    # Each is stopped as soon as it has a checkpoint to resume from; their processes are noted first.
    signals = {killed: lambda pid: os.kill(pid, signal.SIGKILL),   # the command alone, as `kill -9 PID`
               interrupted: lambda pid: os.killpg(pid, signal.SIGINT)}  # Ctrl-C: the terminal's whole group
    children, deadline = {}, time.time() + 180
    while signals:
        for run in [r for r in signals if r.reached(KILL_AFTER, deadline)]:
            children[run] = descendants(run.proc.pid)
            assert children[run], "no temporary server process was found"
            signals.pop(run)(run.proc.pid)
            run.stopped = time.time()
        time.sleep(0.02)

    interrupted.finish(expect=130)  # the output's tail says how far it got if it did not stop
    took = time.time() - interrupted.stopped
    assert not still_alive_after(children[interrupted], 1), f"left behind after Ctrl-C: {children[interrupted]}"
    killed.proc.wait()
    assert not still_alive_after(children[killed], 10), f"left behind after SIGKILL: {children[killed]}"
    lines = [line for line in interrupted.output().splitlines() if line.startswith("dpoflow: interrupted")]
    assert len(lines) == 1 and lines[0].startswith("dpoflow: interrupted during dpo at step "), lines
    assert interrupted.output().count("dpoflow: interrupted") == 1
    assert "re-run `dpoflow run resume` to resume" in lines[0]
    assert "Traceback" not in interrupted.output() and "ConnectError" not in interrupted.output()
    assert took < 10, f"Ctrl-C took {took:.1f} s"
    assert killed.sealed_checkpoints() and len(interrupted.sealed_checkpoints()) <= 2  # keep_checkpoints

    # A newest checkpoint damaged on disk since (its optimizer state cut in half) is skipped, by name.
    newest = next(killed.work.glob(f"checkpoints/dpo/*/attempt-0/checkpoint-{killed.sealed_checkpoints()[-1]}"))
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])

    uninterrupted = whole.finish()
    for run in (killed.start(), interrupted.start()):
        _assert_continues(run.finish(), uninterrupted, run.output(), **BACKENDS[backend])
    assert f"checkpoint {newest} is damaged" in killed.output()
    assert f"dpo: resuming from {newest}" not in killed.output()
