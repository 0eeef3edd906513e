"""The dpoflow CLI as the end-to-end tests run it: a subprocess, as a user types the command."""

import os
import subprocess
from collections.abc import Callable
from pathlib import Path


def demo_command(repo: Path, home: Path, *overrides: str) -> tuple[list[str], dict]:
    """`dpoflow run demo` as a user types it, in the shared workdir, with Prefect's temporary server."""
    env = {**os.environ, "PREFECT_HOME": str(home / "prefect"), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    cmd = ["python", "-m", "dpoflow", "run", "demo", "-f", str(repo / "pipelines.yaml"),
           "--set", f"workdir={home / 'work'}"]
    for item in overrides:
        cmd += ["--set", item]
    return cmd, env


def demo_runner(repo: Path, home: Path) -> Callable[..., subprocess.CompletedProcess]:
    """`run(command, *args)`: `dpoflow <command> demo` in one workdir under `home` (later runs find earlier
    stages cached), asserting it exits 0 and returning the finished process."""
    env = {**os.environ, "PREFECT_HOME": str(home / "prefect"), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)

    def run(command: str, *args: str) -> subprocess.CompletedProcess:
        cmd = ["python", "-m", "dpoflow", command, "demo", "-f", str(repo / "pipelines.yaml"),
               "--set", f"workdir={home / 'work'}", *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc

    return run
