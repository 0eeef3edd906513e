"""The endpoint judge against a real OpenAI-compatible server, offline: llama.cpp's server (from
llama-cpp-python) serving a GGUF that the pipeline itself exported, behind an API key. The key reaches
the server and nowhere else; an unreachable endpoint fails the run with one line after its retries."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow
KEY = "sk-judgekey-7f3a9c21d4e85b60aa17"
# A small training run is enough: the GGUF only has to serve as a judge.
QUICK = ["model.source=builtin:tiny-llama-256", "sft.enabled=false", "dpo.max_steps=4", "evaluate.limit=10",
         "evaluate.gate.mode=warn", "export.formats=[adapter,merged,gguf]", "export.gguf_types=[f16]",
         "export.gguf_pre_tokenizer=gpt-2"]
# llama.cpp's server constrains the reply to this JSON schema (its response_format), so even a random-weight
# model answers with a verdict the pipeline can read.
VERDICT = {"response_format": {"type": "json_object", "schema": {
    "type": "object", "properties": {"winner": {"type": "string", "enum": ["A", "B", "tie"]}},
    "required": ["winner"]}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dpoflow(repo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("judge-llama")
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "OMP_NUM_THREADS": "1", "JUDGE_KEY": KEY}
    env.pop("PREFECT_API_URL", None)

    def run(*overrides: str, expect: int = 0):
        cmd = [sys.executable, "-m", "dpoflow", "run", "demo", "-f", str(repo / "pipelines.yaml"),
               "--set", f"workdir={tmp / 'work'}"]
        for item in [*QUICK, *overrides]:
            cmd += ["--set", item]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc

    run.tmp = tmp
    return run


def failure_line(stderr: str) -> str:
    """The CLI's one line saying why the run failed (Prefect's own log lines may follow it)."""
    return next(line for line in stderr.splitlines() if line.startswith("dpoflow: pipeline 'demo' failed: "))


@pytest.fixture(scope="module")
def served_gguf(dpoflow):
    """The pipeline exports an f16 GGUF; llama.cpp's OpenAI-compatible server serves it with an API key."""
    proc = dpoflow("evaluate.judge.enabled=false")
    run_dir = Path(next(line.split(":", 1)[1].strip() for line in proc.stdout.splitlines()
                        if line.startswith("run folder:")))
    gguf = Path(json.loads((run_dir / "summary.json").read_text())["exports"]["gguf_f16"])
    port = free_port()
    log = open(dpoflow.tmp / "llama-server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                               "--port", str(port), "--n_ctx", "512", "--api_key", KEY],
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(120):
            try:
                if httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, (dpoflow.tmp / "llama-server.log").read_text()[-3000:]
            time.sleep(1)
        else:
            pytest.fail("llama.cpp server did not start: " + (dpoflow.tmp / "llama-server.log").read_text()[-3000:])
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def judge_overrides(url: str) -> list[str]:
    return ["evaluate.judge.enabled=true", "evaluate.judge.kind=openai", f"evaluate.judge.url={url}",
            "evaluate.judge.model=null",
            "evaluate.judge.api_key_env=JUDGE_KEY", "evaluate.judge.limit=6", "evaluate.judge.max_new_tokens=8",
            "evaluate.judge.extra_body=" + json.dumps(VERDICT)]


def test_llama_cpp_server_judges_the_run_and_the_key_stays_out_of_the_records(dpoflow, served_gguf):
    proc = dpoflow(*judge_overrides(served_gguf))
    run_dir = Path(next(line.split(":", 1)[1].strip() for line in proc.stdout.splitlines()
                        if line.startswith("run folder:")))
    summary = json.loads((run_dir / "summary.json").read_text())
    status = {r["stage"]: r["status"] for r in summary["stages"]}
    # Only the judged comparison (and the card that carries it) is new: training and exports are cached.
    assert {s for s, v in status.items() if v == "ran"} == {"answers", "judge", "card"}, status
    j = summary["judge"]
    assert j["judge"] == f"chat model (server default) at {served_gguf}" and j["prompts"] == 6
    assert j["unparseable"] == 0 and j["wins"] + j["ties"] + j["losses"] == 6
    pairs = [json.loads(line) for line in open(run_dir / "judge" / "pairs.jsonl")]
    said = [json.loads(text) for p in pairs for text in p["judge_said"]]
    assert len(said) == 12 and {s["winner"] for s in said} <= {"A", "B", "tie"}

    # The key authenticated every request, and is written nowhere: not in the run's files, its Prefect
    # database, or the terminal.
    assert KEY not in proc.stdout + proc.stderr
    for root in (dpoflow.tmp / "work", dpoflow.tmp / "prefect"):
        for f in root.rglob("*"):
            if f.is_file() and not f.is_symlink():
                assert KEY.encode() not in f.read_bytes(), f


def test_a_refused_key_and_an_unreachable_endpoint_are_one_line(dpoflow, served_gguf):
    # The key is not part of the judge's cache key (the verdicts are the same with any valid key): another
    # seed makes the stage judge again, now without a key.
    wrong = dpoflow(*judge_overrides(served_gguf), "evaluate.judge.api_key_env=NO_SUCH_VARIABLE",
                    "evaluate.judge.seed=1", expect=1)
    last = failure_line(wrong.stderr)
    assert "JudgeUnreachable: judge endpoint" in last and "answered HTTP 401" in last, last

    closed = f"http://127.0.0.1:{free_port()}/v1"
    proc = dpoflow(*judge_overrides(closed), "evaluate.judge.max_attempts=2", expect=1)
    last = failure_line(proc.stderr)
    assert last.startswith(f"dpoflow: pipeline 'demo' failed: JudgeUnreachable: judge endpoint {closed}/chat/"
                           "completions unreachable after 2 attempts (ConnectError"), last
    assert "Traceback" not in proc.stderr  # the run's Prefect log keeps it
