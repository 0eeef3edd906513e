"""Two runs at once on one workdir: different pipelines sharing stages, and the same pipeline twice.
Neither corrupts the other; a stage both need is built once (the second waits on the stage's lock,
then finds it cached)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from dpoflow.base.artifacts import is_intact

pytestmark = pytest.mark.slow


def start(repo, tmp, tag, *overrides):
    env = {**os.environ, "PREFECT_HOME": str(tmp / f"prefect-{tag}"), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    cmd = ["python", "-m", "dpoflow", "run", "demo", "-f", str(repo / "pipelines.yaml"), "--set",
           f"workdir={tmp / 'work'}", "--set", "evaluate.limit=20", "--set", "dpo.epochs=1",
           "--set", "evaluate.gate.mode=warn"]  # one epoch is too short to pass the demo gate; speed matters here
    for item in overrides:
        cmd += ["--set", item]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc) -> dict:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    run_dir = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("run folder:"))
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    return {row["stage"]: row for row in summary["stages"]}


def test_concurrent_runs_share_stages_without_corrupting_them(repo, tmp_path):
    a = start(repo, tmp_path, "a")
    b = start(repo, tmp_path, "b", "dpo.beta=0.2")  # shares model, prepare, sft and baseline with a
    stages_a, stages_b = finish(a), finish(b)
    for shared in ("model", "prepare", "sft", "baseline"):
        assert sorted([stages_a[shared]["status"], stages_b[shared]["status"]]) == ["cached", "ran"], shared
        assert stages_a[shared]["key"] == stages_b[shared]["key"]
    assert stages_a["dpo"]["status"] == stages_b["dpo"]["status"] == "ran"
    for row in list(stages_a.values()) + list(stages_b.values()):
        assert is_intact(Path(row["output"])), row

    c, d = start(repo, tmp_path, "c", "dpo.beta=0.3"), start(repo, tmp_path, "d", "dpo.beta=0.3")
    stages_c, stages_d = finish(c), finish(d)
    assert stages_c["dpo"]["key"] == stages_d["dpo"]["key"]
    assert sorted([stages_c["dpo"]["status"], stages_d["dpo"]["status"]]) == ["cached", "ran"]
    assert (tmp_path / "work" / "runs" / "demo" / "latest" / "summary.json").is_file()
