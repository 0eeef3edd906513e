"""Ctrl-C in any dpoflow command, as a terminal sends it (SIGINT to the command's whole process group):
one line saying what was interrupted, exit code 130, no traceback, and no process of the command (Prefect's
temporary server) left running."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import command_line, descendants, still_alive_after

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process trees from /proc")]

PIPELINES = """
pipelines:
  big:
    cpu_threads: 1
    workdir: work
    model: {source: builtin:tiny-llama}
    data: {sources: [big.jsonl], heldout_fraction: 0.1}
    dpo: {max_length: 128}
"""


@pytest.fixture
def start(tmp_path):
    """`start(*args)`: `python -m dpoflow ARGS` in a session of its own, as a terminal starts a command;
    (process, its output file). Whatever a failed test left running is killed after it."""
    started = []

    def start(*args: str) -> tuple[subprocess.Popen, Path]:
        env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "OMP_NUM_THREADS": "1"}
        env.pop("PREFECT_API_URL", None)
        log = tmp_path / f"{args[0]}.log"
        proc = subprocess.Popen([sys.executable, "-m", "dpoflow", *args, "-f", str(tmp_path / "pipelines.yaml")],
                                env=env, cwd=tmp_path, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        started.append(proc)
        return proc, log

    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_for(proc: subprocess.Popen, log: Path, ready, what: str, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not ready():
        assert proc.poll() is None, f"the command ended before {what}:\n" + log.read_text()[-3000:]
        assert time.time() < deadline, f"no {what} after {seconds} s:\n" + log.read_text()[-3000:]
        time.sleep(0.05)


def _assert_interrupted(proc: subprocess.Popen, log: Path, children: list[int], line: str) -> None:
    code = proc.wait(timeout=60)
    output = log.read_text()
    assert code == 130, output[-3000:]
    assert "Traceback" not in output, output[-5000:]
    assert [s for s in output.splitlines() if "interrupted" in s] == [line], output[-3000:]
    left = still_alive_after(children, 2)
    assert not left, "left running: " + "; ".join(command_line(p) for p in left)


def test_ctrl_c_during_prepare_prints_one_line_and_leaves_no_process(tmp_path, start):
    with open(tmp_path / "big.jsonl", "w") as f:  # enough rows that prepare takes far longer than the test waits
        for i in range(200_000):
            f.write(json.dumps({"prompt": f"question {i}: is {i} even?", "chosen": "yes" if i % 2 == 0 else "no",
                                "rejected": "no" if i % 2 == 0 else "yes"}) + "\n")
    (tmp_path / "pipelines.yaml").write_text(PIPELINES)
    proc, log = start("prepare", "big")
    # prepare's scratch folder appears once it has begun reading the rows
    _wait_for(proc, log, lambda: any((tmp_path / "work" / "stages" / "prepare").glob("*-candidates")),
              "prepare stage")
    time.sleep(0.5)
    children = descendants(proc.pid)
    assert children, "no temporary server process was found"
    os.killpg(proc.pid, signal.SIGINT)
    _assert_interrupted(proc, log, children, "dpoflow: interrupted during prepare; re-run `dpoflow prepare big` "
                                             "to resume")


@pytest.mark.parametrize("command", ["doctor", "explain"])
def test_ctrl_c_during_a_command_that_runs_no_pipeline_prints_one_line(tmp_path, start, command):
    (tmp_path / "pipelines.yaml").write_text(PIPELINES)
    (tmp_path / "big.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    proc, log = start(command, "big")
    # Both import torch before their work (the hardware plan, the cache lookups): interrupt them there.
    _wait_for(proc, log, lambda: "libtorch_cpu" in Path(f"/proc/{proc.pid}/maps").read_text(), "torch import")
    children = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    _assert_interrupted(proc, log, children, f"dpoflow: interrupted during `dpoflow {command} big`; run it again "
                                             "to finish")
