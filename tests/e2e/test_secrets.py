"""Secrets in a pipeline's config never leave in what a run records: a token of its own is planted in
every config field that takes free text (and set with --set), the demo runs through the CLI with its
own Prefect database and pushes to a test Hub, and then every file under the run's folders (workdir,
the Prefect database under PREFECT_HOME), the CLI's output and every file of the pushed commit are
searched for each token. The run itself still used the real values."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from hubserver import HubServer

pytestmark = pytest.mark.slow
HF_TOKEN = "hf_" + "Hub7Token" * 4
REPO = "someone/secrets-dpo"
# One secret per field, each its own, so a leak names its field. Values under an env mapping or a
# secret-named key are secrets whatever they look like; elsewhere they are found by their form.
PLANTED = {
    "description": "hf_" + "Desc9Leak" * 4,
    "data.system_prompt": "sk-" + "Sys4Prompt" * 3,
    "deploy.tags": "ghp_" + "Tag5Leak" * 5,
    "deploy.work_queue": "AKIA" + "QUEUE7LEAK234567",
    "deploy.repository": "plain-url-password-7431",
    "deploy.job_variables.env.HF_TOKEN": "hf_" + "Env3Token" * 4,
    "deploy.job_variables.env.DATABASE_URL": "plain-env-value-5522",
    "deploy.job_variables.api_key": "plain-api-key-value-9913",
    "deploy.job_variables.image": "Zx8Qw3Lp9Vb2Nm7Ks4Jd6Hf1Gt5Ry0UeT",
    "export.gguf_pre_tokenizer": "Bearer plainbearer-6650",
    "tracking.tags.note": "ghp_" + "TrackTag3Leak" * 3,
    "tracking.tags.api_token": "plain-tracking-tag-6071",
    "--set description": "hf_" + "SetFlag2Leak" * 3,
    "--set deploy.job_variables.env.EXTRA": "plain-set-env-value-8190",
}


@pytest.fixture(scope="module")
def planted_run(repo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secrets")
    doc = yaml.safe_load((repo / "pipelines.yaml").read_text())
    demo = doc["pipelines"]["demo"]
    demo["data"]["sources"] = [str(repo / s) for s in demo["data"]["sources"]]
    demo["description"] = PLANTED["description"]
    demo["data"]["system_prompt"] = f"You label sentiment. {PLANTED['data.system_prompt']}"
    demo["export"]["gguf_pre_tokenizer"] = PLANTED["export.gguf_pre_tokenizer"]
    # Sent to a real MLflow store in the workdir, which is searched with everything else.
    demo["tracking"] = {"backend": "mlflow", "tags": {"note": f"by {PLANTED['tracking.tags.note']}",
                                                      "api_token": PLANTED["tracking.tags.api_token"]}}
    demo["deploy"] = {"tags": ["team-a", PLANTED["deploy.tags"]], "work_queue": PLANTED["deploy.work_queue"],
                      "repository": f"https://bot:{PLANTED['deploy.repository']}@git.example.com/org/repo.git",
                      "job_variables": {"image": "registry.example.com/dpoflow:"
                                                         + PLANTED["deploy.job_variables.image"],
                                        "api_key": PLANTED["deploy.job_variables.api_key"],
                                        "env": {"HF_TOKEN": PLANTED["deploy.job_variables.env.HF_TOKEN"],
                                                "DATABASE_URL": PLANTED["deploy.job_variables.env.DATABASE_URL"]}}}
    file = tmp / "pipelines.yaml"
    file.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "OMP_NUM_THREADS": "1", "HF_TOKEN": HF_TOKEN,
           "HF_HUB_DISABLE_XET": "1"}
    env.pop("PREFECT_API_URL", None)
    with HubServer(HF_TOKEN) as hub:
        cmd = ["python", "-m", "dpoflow", "run", "demo", "-f", str(file), "--set", f"workdir={tmp / 'work'}",
               "--set", "publish.enabled=true", "--set", f"publish.repo_id={REPO}",
               "--set", f"publish.endpoint={hub.url}",
               "--set", f"description={PLANTED['--set description']}",
               "--set", f"deploy.job_variables.env.EXTRA={PLANTED['--set deploy.job_variables.env.EXTRA']}"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        pushed = {path: hub.file(REPO, path) for path in hub.repos[REPO].files["main"]}
    return tmp, file, proc.stdout + proc.stderr, pushed


def leaks(data: bytes) -> list[str]:
    return [field for field, secret in [*PLANTED.items(), ("HF_TOKEN variable", HF_TOKEN)] if secret.encode() in data]


def is_training_text(path: Path, work: Path) -> bool:
    """The prepared pairs carry the system prompt into training by design, and the judged answers keep
    the prompts they answered: it is data, not a record."""
    return (any(path.is_relative_to(work / "stages" / stage) for stage in ("prepare", "answers", "judge"))
            and path.suffix in (".parquet", ".jsonl"))


def test_no_planted_secret_is_in_any_file_the_run_wrote_or_in_the_prefect_database(planted_run):
    tmp, file, _, _ = planted_run
    work = tmp / "work"
    searched = [p for p in tmp.rglob("*") if p.is_file() and not p.is_symlink() and p != file
                and not is_training_text(p, work)]
    assert any(p.suffix == ".db" for p in searched)  # the Prefect database (sqlite) is among them
    assert {"config.json", "summary.json", "summary.md", "README.md"} <= {p.name for p in searched}
    assert "mlflow.db" in {p.name for p in searched}  # the tracker's store, and its artifacts below
    assert any(p.name == "summary.md" and "mlartifacts" in p.parts for p in searched)
    found = {str(p.relative_to(tmp)): leaks(p.read_bytes()) for p in searched}
    assert {p: f for p, f in found.items() if f} == {}


def test_the_records_say_what_was_redacted(planted_run):
    tmp, _, _, _ = planted_run
    latest = tmp / "work" / "runs" / "demo" / "latest"
    config = json.loads((latest / "config.json").read_text())
    assert config["deploy"]["job_variables"]["env"] == {"HF_TOKEN": "<redacted>", "DATABASE_URL": "<redacted>",
                                                        "EXTRA": "<redacted>"}
    assert config["description"] == "<redacted>" and config["dpo"]["beta"] == 0.1
    summary = json.loads((latest / "summary.json").read_text())
    assert "description=<redacted>" in summary["overrides"]
    assert "deploy.job_variables.env.EXTRA=<redacted>" in summary["overrides"]


def test_nothing_secret_and_no_local_path_is_in_the_pushed_commit_or_the_output(planted_run, repo):
    tmp, _, output, pushed = planted_run
    assert leaks(output.encode()) == []
    card = pushed["README.md"].decode()
    assert {p: leaks(data) for p, data in pushed.items() if leaks(data)} == {}
    for local in (str(tmp), str(repo), "/home/", "/work/"):
        assert local not in card, local
    assert "| `sentiment.jsonl` |" in card and "- sentiment.jsonl" in card  # named by file name, with its hash


def test_the_run_used_the_real_values(planted_run):
    import pandas as pd

    from dpoflow.base.config import load_pipeline

    tmp, file, _, _ = planted_run
    train = next((tmp / "work" / "stages" / "prepare").rglob("train.parquet"))
    assert PLANTED["data.system_prompt"] in pd.read_parquet(train).iloc[0]["prompt"]
    # What `dpoflow sync` reads for the deployment is the file's real config, not a redacted one.
    config = load_pipeline("demo", file)
    assert config.deploy.job_variables["env"]["HF_TOKEN"] == PLANTED["deploy.job_variables.env.HF_TOKEN"]
