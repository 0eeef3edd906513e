"""The dpoflow CLI as the end-to-end tests run it: a subprocess, as a user types the command."""

import os
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
