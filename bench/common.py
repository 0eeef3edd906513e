"""What the benchmark scripts share: one configuration per child process, and one JSON line per result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run_worker(argv: list[str], cwd=None) -> tuple[dict | None, subprocess.CompletedProcess]:
    """Run `python argv...` and return the JSON of its `RESULT ` line (None if it printed none) and the
    finished process. A child process per configuration: Unsloth patches TRL when imported, and each
    measurement starts from an empty GPU."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=cwd)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    return (json.loads(line[len("RESULT "):]) if line else None), proc


def report(result: dict, out: str | None, prefix: str = "RESULT ") -> None:
    """Print the result as one JSON line, and append it to `out` when given."""
    line = json.dumps(result)
    print(prefix + line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def scratch() -> Path:
    """A temporary folder removed when the bench exits: an 8B model copy is 16 GB, and a GPU machine's
    disk (64 GiB) fills after a few benches that leave theirs behind."""
    import atexit
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="dpoflow-bench-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder
