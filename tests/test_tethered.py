"""dpoflow.base.tethered: a child runs its module as `python -m` would, and stops once the process that
started it is gone, even when that process was killed with SIGKILL and ran no cleanup."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from processes import alive, still_alive_after

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process states from /proc")


def test_a_tethered_child_runs_its_module_and_stops_when_its_parent_is_killed(repo):
    # The parent starts the child from a worker thread that ends at once: the child must follow the
    # parent process, not the thread that started it (what PR_SET_PDEATHSIG would do).
    parent = textwrap.dedent("""
        import subprocess, sys, threading, time
        from dpoflow.base import tethered

        def start():
            child = subprocess.Popen(tethered.command("http.server", "0", "--bind", "127.0.0.1"),
                                     stdout=subprocess.PIPE, text=True)
            print(child.pid, child.stdout.readline().strip(), flush=True)

        threading.Thread(target=start).start()
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(repo)})
    pid, serving = proc.stdout.readline().split(" ", 1)
    child = int(pid)
    try:
        assert serving.startswith("Serving HTTP on 127.0.0.1 port")  # the module ran, with its arguments
        assert still_alive_after([child], 1.5) == [child]  # the thread that started it has ended; it runs on
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert still_alive_after([child], 5) == []
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)
