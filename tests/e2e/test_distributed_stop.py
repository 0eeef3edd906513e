"""A `dpoflow run` training on two processes (torchrun, gloo on CPU) leaves nothing running when it is
stopped: killed with SIGKILL (no cleanup of its own runs), torchrun and its ranks stop within seconds;
Ctrl-C stops them too, with one line and exit code 130."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import alive, command_line, descendants, still_alive_after

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process trees from /proc")]

PIPELINE = """
pipelines:
  dist:
    cpu_threads: 1
    model: {{source: "builtin:tiny-llama"}}
    data: {{sources: ["{data}"], heldout_fraction: 0.12, decontamination: {{ngram: 16}}}}
    train: {{backend: trl, distributed: {{num_processes: 2}}}}
    dpo:
      max_steps: 400
      per_device_batch_size: 4
      gradient_accumulation_steps: 1
      max_length: 128
      guards: {{checkpoint_steps: 2}}
    evaluate: {{enabled: false}}
    export: {{formats: [adapter]}}
"""


class Run:
    """`dpoflow run dist` in a workdir of its own and a session of its own, as a terminal starts it."""

    def __init__(self, tmp: Path, repo: Path, name: str):
        self.work = tmp / name
        file = tmp / "pipelines.yaml"
        if not file.exists():
            file.write_text(PIPELINE.format(data=repo / "data" / "demo" / "sentiment.jsonl"))
        (self.work / "prefect").mkdir(parents=True)
        env = {**os.environ, "PREFECT_HOME": str(self.work / "prefect"), "OMP_NUM_THREADS": "1"}
        env.pop("PREFECT_API_URL", None)
        self.log = tmp / f"{name}.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "dpoflow", "run", "dist", "-f", str(file),
                                      "--set", f"workdir={self.work}"], env=env, stdout=open(self.log, "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text()

    def training(self, deadline: float) -> bool:
        """Whether the ranks have sealed a checkpoint (so they are well into training), while the run runs."""
        assert self.proc.poll() is None, "the run ended before it could be stopped:\n" + self.output()[-3000:]
        assert time.time() < deadline, "no checkpoint in time:\n" + self.output()[-3000:]
        return any(self.work.glob("checkpoints/dpo/*/attempt-0/checkpoint-*/manifest.json"))


def _left(processes: dict[int, str], seconds: float) -> str:
    return "; ".join(processes[p] for p in still_alive_after(list(processes), seconds))


def test_torchrun_and_its_ranks_stop_when_the_command_is_killed_or_interrupted(repo, tmp_path):
    runs = {"killed": Run(tmp_path, repo, "killed"), "interrupted": Run(tmp_path, repo, "interrupted")}
    children, stopped, deadline = {}, {}, time.time() + 480
    try:
        while len(stopped) < len(runs):
            for name, run in runs.items():
                if name not in stopped and run.training(deadline):
                    children[name] = {pid: command_line(pid) for pid in descendants(run.proc.pid)}
                    if name == "killed":
                        os.kill(run.proc.pid, signal.SIGKILL)  # the command alone, as `kill -9 PID`
                    else:
                        os.killpg(run.proc.pid, signal.SIGINT)  # Ctrl-C: the terminal's whole group
                    stopped[name] = time.time()
            time.sleep(0.05)
        for name in runs:  # the ranks, torchrun (tethered) and the temporary server were all running
            lines = list(children[name].values())
            torchrun = [c for c in lines if "torch.distributed.run" in c]
            assert len(torchrun) == 1, lines
            assert sum("dpoflow.engine.distributed" in c and c not in torchrun for c in lines) == 2, lines  # the ranks
            assert any("uvicorn" in c for c in lines), lines

        killed, interrupted = runs["killed"], runs["interrupted"]
        code = interrupted.proc.wait(timeout=60)
        took = time.time() - stopped["interrupted"]
        after_ctrl_c = _left(children["interrupted"], 2)
        killed.proc.wait()
        after_kill = _left(children["killed"], 10)
        assert not after_kill and not after_ctrl_c, (f"left running after SIGKILL: {after_kill}\n"
                                                     f"left running after Ctrl-C: {after_ctrl_c}")
        output = interrupted.output()
        assert code == 130, output[-3000:]
        lines = [line for line in output.splitlines() if "interrupted" in line]
        assert lines == ["dpoflow: interrupted during dpo; re-run `dpoflow run dist` to resume"], output[-3000:]
        assert "Traceback" not in output, output[-5000:]
        assert took < 20, f"Ctrl-C took {took:.1f} s"
    finally:  # whatever a failed test left running: the commands, and what they started
        for run in runs.values():
            if run.proc.poll() is None:
                os.killpg(run.proc.pid, signal.SIGKILL)
                run.proc.wait()
        for pid in [p for pids in children.values() for p in pids if alive(p)]:
            os.kill(pid, signal.SIGKILL)
