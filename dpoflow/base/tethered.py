"""Child processes that stop when the process that started them is gone.

A command killed with SIGKILL runs no cleanup, and its children (Prefect's temporary server, torchrun
and its ranks) would run on as orphans. `command()` runs a Python module as `python -m dpoflow.base.tethered
PARENT_PID MODULE ARGS...`: the module runs as `python -m MODULE ARGS...` would, plus a thread that sends
the process SIGTERM, the module's own clean shutdown (uvicorn's; torchrun's, which stops its ranks),
once the parent is gone. Polling the parent id works on every POSIX system; Linux's PR_SET_PDEATHSIG
would fire when the parent's *thread* that started the child ends (a boot thread, a Prefect worker
thread), not the parent."""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time

POLL_SECONDS = 0.5
GRACE_SECONDS = 40  # for the clean shutdown (torchrun gives its ranks 30 s); then it exits regardless


def command(module: str, *args: str) -> list[str]:
    """The argv of `python -m MODULE ARGS...` that stops by itself once this process is gone."""
    return [sys.executable, "-m", "dpoflow.base.tethered", str(os.getpid()), module, *args]


def _watch(parent: int) -> None:
    while os.getppid() == parent:  # a process whose parent died is re-parented: its parent id changes
        time.sleep(POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_SECONDS)
    os._exit(1)


def run_module_while_parent_lives(parent: int, module: str, args: list[str]) -> None:
    threading.Thread(target=_watch, args=(parent,), name="parent-watch", daemon=True).start()
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    run_module_while_parent_lives(int(sys.argv[1]), sys.argv[2], sys.argv[3:])
