"""One training stage on several processes. The stage's task calls `run_stage`; with more than one
process it writes the call to a job file and starts `torchrun` on this module. Every rank calls the
same stage function, and transformers' Trainer (through accelerate) sees torchrun's environment and
trains data-parallel, DDP or FSDP. Rank 0 writes the outputs and the result record, which comes back
to the task; every line the ranks print is passed to the task's logger as it comes.

The call crosses the process boundary as JSON, typed by the stage function's own annotations, so a
stage needs nothing special to run distributed beyond writing its files on the main process only.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path
from typing import Any, Callable, get_type_hints

from dpoflow.base import tethered
from dpoflow.base.ranks import is_main_process, world_size

# Multicast over NVLink can take a shared host's GPUs down; it stays off in every rank we start.
NVLINK_MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                        "NVSHMEM_DISABLE_NVLS": "1"}
JOB_ENV = "DPOFLOW_DISTRIBUTED_JOB"
# In-process objects: a launched stage gets the launcher's own hooks (see `main`), and its ranks load
# their own models rather than take one the flow keeps.
NOT_SENT = ("callbacks", "keeper")


class LaunchError(RuntimeError):
    pass


def run_stage(fn: Callable, processes: int, log: Callable[[str], None] = print, **kwargs) -> Any:
    """`fn(**kwargs)` here, or on `processes` ranks through torchrun when that is more than one."""
    if processes <= 1 or JOB_ENV in os.environ:
        return fn(**kwargs)
    return launch(fn, kwargs, processes, log)


def launch(fn: Callable, kwargs: dict[str, Any], processes: int, log: Callable[[str], None],
           step_times: Path | None = None) -> Any:
    hints = get_type_hints(fn)
    from pydantic import TypeAdapter

    sent = {k: TypeAdapter(hints[k]).dump_python(v, mode="json") for k, v in kwargs.items() if k not in NOT_SENT}
    with tempfile.TemporaryDirectory(prefix="dpoflow-launch-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps({"function": f"{fn.__module__}:{fn.__qualname__}", "kwargs": sent,
                                        "result": str(result_file),
                                        "step_times": str(step_times) if step_times else None}))
        torchrun = ["--nnodes", "1", "--nproc-per-node", str(processes), "--master-addr", "127.0.0.1",
                    "--master-port", str(_free_port()),
                    # Each rank writes its own log files (two ranks sharing one pipe splice each other's
                    # partial lines); _RankLogs relays them line by line.
                    "--log-dir", str(Path(tmp) / "logs"), "--redirects", "3",
                    "-m", "dpoflow.engine.distributed", str(job_file)]
        env = {**os.environ, **NVLINK_MULTICAST_OFF, JOB_ENV: str(job_file), "TQDM_DISABLE": "1",
               "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [_import_root(), os.environ.get("PYTHONPATH")]))}
        log(f"launching {fn.__name__} on {processes} processes: torchrun {' '.join(torchrun)}")
        tail: deque[str] = deque(maxlen=30)

        def relay(line: str) -> None:
            tail.append(line)
            log(line)

        ranks = _RankLogs(Path(tmp) / "logs", relay)
        # torchrun stops its ranks when it gets SIGTERM (SIGTERM to each, SIGKILL after 30 s). It is
        # tethered: once this process is gone (killed with SIGKILL, say), it gets that SIGTERM. And it
        # runs in a session of its own, so a terminal's Ctrl-C reaches only this process, which stops it
        # the same way: torchrun would pass a SIGINT on to its ranks, which then linger (seen: still
        # running seconds after the command had exited) and print their tracebacks.
        with subprocess.Popen(tethered.command("torch.distributed.run", *torchrun), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env, bufsize=1,
                              start_new_session=True) as proc:
            pump = threading.Thread(target=ranks.follow, args=(proc,), daemon=True)
            pump.start()
            try:
                for line in proc.stdout:  # torchrun's own messages
                    relay(line.rstrip())
                code = proc.wait()
            except BaseException:  # Ctrl-C, or any error here: the ranks stop with the stage
                ranks.stopped.set()  # what they print while stopping is no news
                proc.terminate()
                proc.wait()
                raise
            pump.join()
        if code != 0 or not result_file.is_file():
            errors = sorted(Path(tmp).glob("error-rank*.txt"))
            why = "\n".join(f"{e.stem.removeprefix('error-')}: {e.read_text()}" for e in errors) or \
                "last lines:\n" + "\n".join(tail)
            raise LaunchError(f"{fn.__name__} on {processes} processes failed (torchrun exit code {code})\n{why}")
        return TypeAdapter(hints["return"]).validate_python(json.loads(result_file.read_text()))


class _RankLogs:
    """Follows the per-rank log files torchrun writes (<log dir>/<run>/attempt_N/<rank>/std{out,err}.log)
    and passes each complete line on as `[rank N] line`, while the ranks run and once more at the end."""

    def __init__(self, folder: Path, relay: Callable[[str], None]):
        self.folder, self.relay = folder, relay
        self.read: dict[Path, int] = {}
        self.partial: dict[Path, str] = {}
        self.stopped = threading.Event()

    def follow(self, proc: subprocess.Popen) -> None:
        while proc.poll() is None and not self.stopped.wait(0.3):
            self.pump()
        if not self.stopped.is_set():
            self.pump(final=True)

    def pump(self, final: bool = False) -> None:
        for file in sorted(self.folder.glob("**/std*.log")):
            with open(file, "rb") as f:
                f.seek(self.read.get(file, 0))
                chunk = f.read()
            self.read[file] = self.read.get(file, 0) + len(chunk)
            text = self.partial.pop(file, "") + chunk.decode("utf-8", errors="replace")
            lines = text.split("\n")
            if not final:
                self.partial[file] = lines.pop()  # an unfinished line waits for its end
            for line in lines:
                if line.strip():
                    self.relay(f"[rank {file.parent.name}] {line.rstrip()}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _import_root() -> str:
    """The folder `dpoflow` imports from, so ranks import this same code (an editable install or a
    bare checkout on PYTHONPATH)."""
    return str(Path(__file__).resolve().parents[2])


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    module, name = job["function"].split(":")
    fn = getattr(importlib.import_module(module), name)
    hints = get_type_hints(fn)
    from pydantic import TypeAdapter

    kwargs = {k: TypeAdapter(hints[k]).validate_python(v) for k, v in job["kwargs"].items()}
    print(f"dpoflow rank {os.environ.get('RANK')} of {world_size()}: {name}", flush=True)
    if job.get("step_times"):
        from dpoflow.engine.training import step_clock

        kwargs["callbacks"] = (step_clock(Path(job["step_times"])),)
    try:
        result = fn(**kwargs)
    except Exception as e:  # the launcher reports this rank's own error, not torchrun's summary
        Path(job["result"]).with_name(f"error-rank{os.environ.get('RANK')}.txt").write_text(
            f"{type(e).__name__}: {e}")
        raise
    if is_main_process():
        Path(job["result"]).write_text(json.dumps(TypeAdapter(hints["return"]).dump_python(result, mode="json")))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
