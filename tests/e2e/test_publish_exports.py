"""What a release pushes is what the export stage produced: files dropped into the export folder after
it (a desktop's `.DS_Store`, notes) are never uploaded, through the CLI against a Hub-compatible server."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hubserver import HubServer

pytestmark = pytest.mark.slow
TOKEN = "hf_test_" + "p4" * 12
REPO = "someone/exports-dpo"
STRAY = {".DS_Store": b"\0\0\0\1Bud1\0", "adapter/notes.txt": b"private notes about this run\n",
         "adapter/.DS_Store": b"\0\0\0\1Bud1\1"}


def test_a_stray_file_in_the_export_folder_is_never_pushed(repo, tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "OMP_NUM_THREADS": "1", "HF_TOKEN": TOKEN,
           "HF_HUB_DISABLE_XET": "1"}
    env.pop("PREFECT_API_URL", None)
    with HubServer(TOKEN) as hub:
        def run(revision: str) -> dict:
            cmd = [sys.executable, "-m", "dpoflow", "run", "demo", "-f", str(repo / "pipelines.yaml"),
                   "--set", f"workdir={tmp_path / 'work'}", "--set", "sft.enabled=false", "--set", "dpo.max_steps=4",
                   "--set", "evaluate.limit=10", "--set", "evaluate.gate.required_gain={}",
                   "--set", "evaluate.gate.max_drop=100", "--set", "export.formats=[adapter]",
                   "--set", "publish.enabled=true", "--set", f"publish.repo_id={REPO}",
                   "--set", f"publish.endpoint={hub.url}", "--set", f"publish.revision={revision}"]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=repo)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
            summary = json.loads((tmp_path / "work" / "runs" / "demo" / "latest" / "summary.json").read_text())
            return {row["stage"]: row for row in summary["stages"]}

        first = run("main")
        export = Path(first["export"]["output"])
        produced = sorted(json.loads((export / "manifest.json").read_text())["files"])
        assert produced and all(name.startswith("adapter/") for name in produced)
        assert sorted(hub.repos[REPO].files["main"]) == sorted(["README.md", *produced])

        for name, content in STRAY.items():
            (export / name).write_bytes(content)
        second = run("after-stray-files")
        assert first["export"]["status"] == "ran" and second["export"]["status"] == "cached"
        assert second["publish"]["status"] == "ran"
        # The branch starts as main; the push adds to it what differs, and a stray file would be new.
        assert sorted(hub.repos[REPO].files["after-stray-files"]) == sorted(["README.md", *produced])
        assert all(set(c["files"]) <= {"README.md", *produced} for c in hub.commits(REPO, "after-stray-files"))
