"""A release end to end through the CLI: GGUF files made with llama.cpp's tools and verified in
llama.cpp, a model card, and a push to a Hub-compatible server with the real huggingface_hub client;
a re-run pushes nothing, a failed gate pushes nothing, and the token appears in no file or log line."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from hubserver import HubServer

pytestmark = pytest.mark.slow
TOKEN = "hf_secret_" + "k9" * 14
REPO = "someone/demo-dpo"


@pytest.fixture(scope="module")
def hub():
    with HubServer(TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def release(repo, hub, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("release")
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "OMP_NUM_THREADS": "1", "HF_TOKEN": TOKEN,
           "HF_HUB_DISABLE_XET": "1"}
    env.pop("PREFECT_API_URL", None)
    outputs = []

    def run(*overrides: str, expect: int = 0, env_token: str | None = TOKEN, extra_env: dict | None = None) -> dict:
        run_env = {**env, "HF_TOKEN": env_token} if env_token else {k: v for k, v in env.items() if k != "HF_TOKEN"}
        run_env.update(extra_env or {})
        cmd = ["python", "-m", "dpoflow", "run", "demo", "-f", str(repo / "pipelines.yaml"),
               "--set", f"workdir={tmp / 'work'}", "--set", "model.source=builtin:tiny-llama-256",
               "--set", "export.formats=[adapter,merged,gguf]", "--set", "export.gguf_types=[f16,bf16,q8_0,q4_k_m]",
               "--set", "export.gguf_pre_tokenizer=gpt-2", "--set", "publish.enabled=true",
               "--set", f"publish.repo_id={REPO}", "--set", f"publish.endpoint={hub.url}"]
        for item in overrides:
            cmd += ["--set", item]
        proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=900, cwd=repo)
        outputs.append(proc.stdout + proc.stderr)
        assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-5000:]
        latest = tmp / "work" / "runs" / "demo" / "latest"
        return json.loads((latest / "summary.json").read_text())

    return run, tmp, outputs


def test_gguf_exports_are_verified_in_llama_cpp_and_the_release_is_pushed_once(release, hub):
    run, tmp, outputs = release
    first = run()
    checks = first["gguf_checks"]
    assert set(checks) == {"f16", "bf16", "q8_0", "q4_k_m"}
    assert checks["f16"]["greedy_agree"].split("/")[0] == checks["f16"]["greedy_agree"].split("/")[1]
    assert checks["q4_k_m"]["tensor_types"].get("Q4_K", 0) > 0  # hidden 256: a real k-quant, no fallback
    assert checks["q8_0"]["min_cosine"] >= 0.995
    gguf = Path(first["exports"]["gguf_q4_k_m"]).parent
    assert (gguf / "Modelfile").read_text().startswith("FROM ./model-q4_k_m.gguf")

    card = Path(first["card"]).read_text()
    for part in ("base_model: builtin:tiny-llama-256", "## Forgetting check", "| dpoflow_preference |",
                 "model-q4_k_m.gguf", "Pipeline commit: `", "ollama create", "rewards/accuracies"):
        assert part in card, part

    assert first["published"]["new_commit"] and first["published"]["repo_id"] == REPO
    [commit] = hub.commits(REPO)
    assert commit["title"].startswith("dpoflow: pipeline demo, run ")
    assert {"README.md", "merged/model.safetensors", "adapter/adapter_model.safetensors",
            "gguf/model-q4_k_m.gguf", "gguf/Modelfile"} <= set(commit["files"])
    assert hub.repos[REPO].private

    again = run()
    assert {r["stage"]: r["status"] for r in again["stages"]}["publish"] == "cached"
    assert len(hub.commits(REPO)) == 1


def test_a_failed_gate_in_warn_mode_exports_but_does_not_push(release, hub):
    run, _, _ = release
    warned = run("evaluate.gate.required_gain={dpoflow_preference: 99}", "evaluate.gate.mode=warn")
    assert warned["forgetting"]["passed"] is False and warned["published"] is None
    assert "publish" not in {r["stage"] for r in warned["stages"]}
    assert len(hub.commits(REPO)) == 1


def test_the_token_is_in_no_file_and_no_log_line(release):
    _, tmp, outputs = release
    assert outputs and all(TOKEN not in out for out in outputs)
    secret = TOKEN.encode()
    leaked = [str(p) for p in tmp.rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert leaked == []


def test_the_token_can_come_from_a_prefect_secret_block(release, hub, repo):
    run, tmp, outputs = release
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect")}
    env.pop("PREFECT_API_URL", None)
    save = subprocess.run(["python", "-c", "import sys; from prefect.blocks.system import Secret; "
                           "Secret(value=sys.stdin.read()).save('hub-token', overwrite=True)"],
                          input=TOKEN, env=env, capture_output=True, text=True, timeout=300)
    assert save.returncode == 0, save.stderr[-2000:]
    summary = run("publish.token_secret=hub-token", "publish.revision=from-secret", env_token=None)
    assert summary["published"]["new_commit"]
    assert len(hub.commits(REPO, "from-secret")) == len(hub.commits(REPO, "main")) + 1


def test_offline_mode_fails_the_push_at_once_with_one_clear_line(release, hub):
    run, _, outputs = release
    before = len(hub.requests)
    run("publish.revision=offline-try", expect=1, extra_env={"HF_HUB_OFFLINE": "1"})  # a new publish key
    assert "publish needs the network, but HF_HUB_OFFLINE=1 is set" in outputs[-1]
    assert "retrying" not in outputs[-1]
    assert hub.requests[before:] == [] and "offline-try" not in hub.repos[REPO].branches
