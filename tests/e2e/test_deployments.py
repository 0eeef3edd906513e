"""Deployments against a real Prefect server on 127.0.0.1: `dpoflow sync` creates them from a
pipelines file, a run triggered the way the UI's Run button does (POST create_flow_run with
overrides) executes on a process worker with those overrides, a second sync changes nothing, a dry
run changes nothing, and a pipeline removed from the file takes its deployment and scheduled runs
with it."""

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

PIPELINES = """
pipelines:
  tiny-deployed:
    cpu_threads: 1
    data:
      sources: [sentiment.jsonl]
      heldout_fraction: 0.12
      decontamination: {ngram: 16}
    dpo: {learning_rate: 1.0e-3, max_steps: 6, per_device_batch_size: 8, gradient_accumulation_steps: 1,
          max_length: 128}
    evaluate: {limit: 10, gate: {max_drop: 100}}
    export: {formats: [adapter]}
    deploy:
      enabled: true
      work_pool: dpoflow-test
      tags: [team-a]
      schedules: [{cron: "0 3 * * *", timezone: Europe/Paris}]
  nightly:
    data: {sources: [sentiment.jsonl]}
    deploy:
      enabled: true
      schedules: [{interval_seconds: 3600}]
  not-deployed:
    data: {sources: [sentiment.jsonl]}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, repo):
    tmp = tmp_path_factory.mktemp("deploy")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_UI_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5", "OMP_NUM_THREADS": "1",
           "PREFECT_LOGGING_LEVEL": "INFO"}
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        proc.terminate()
        pytest.fail("prefect server did not start: " + (tmp / "server.log").read_text()[-2000:])
    project = tmp / "project"
    project.mkdir()
    shutil.copy(repo / "data" / "demo" / "sentiment.jsonl", project / "sentiment.jsonl")
    (project / "pipelines.yaml").write_text(PIPELINES)
    yield {"env": env, "api": api, "project": project, "tmp": tmp}
    proc.terminate()
    proc.wait(timeout=30)


def dpoflow(server, *args, expect=0):
    proc = subprocess.run(["python", "-m", "dpoflow", *args, "-f", str(server["project"] / "pipelines.yaml")],
                          env=server["env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def api(server, method: str, path: str, **kwargs):
    """One call to the server's REST API, the way Prefect's own client makes it: 429, 502 and 503 are
    retried (the server answers 503 for errors it calls retryable, e.g. a busy SQLite database on a
    loaded machine); any other non-2xx fails the test with the server's answer."""
    deadline = time.time() + 90
    while True:
        response = httpx.request(method, f"{server['api']}{path}", timeout=30, **kwargs)
        if response.status_code not in (429, 502, 503) or time.time() > deadline:
            break
        time.sleep(2)
    assert response.is_success, (f"{method} {path}: {response.status_code} {response.text[:2000]}\n"
                                 + (server["tmp"] / "server.log").read_text()[-3000:])
    return response.json()


def deployments(server) -> dict:
    return {d["name"]: d for d in api(server, "POST", "/deployments/filter", json={})}


def scheduled_runs(server, deployment_id) -> list:
    body = {"deployments": {"id": {"any_": [deployment_id]}}, "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}
    return api(server, "POST", "/flow_runs/filter", json=body)


def run_to_the_end(server, deployment_id, parameters, timeout=420) -> str:
    """Start a run the way the UI's Run button does, and wait for its final state type."""
    run = api(server, "POST", f"/deployments/{deployment_id}/create_flow_run", json={"parameters": parameters})
    deadline, state = time.time() + timeout, None
    while time.time() < deadline:
        state = api(server, "GET", f"/flow_runs/{run['id']}")["state"]["type"]
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(2)
    return state


def test_sync_creates_runs_and_prunes_deployments(server):
    proc = subprocess.run(["python", "-m", "dpoflow", "sync", "-f", str(server["project"] / "pipelines.yaml")],
                          env=server["env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "work pool 'dpoflow-test' (deploy.work_pool of tiny-deployed) does not exist" \
        in proc.stderr
    subprocess.run(["prefect", "work-pool", "create", "dpoflow-test", "--type", "process"], env=server["env"],
                   check=True, capture_output=True, timeout=120)
    out = dpoflow(server, "sync")
    assert "create    nightly" in out and "create    tiny-deployed" in out and "not-deployed" not in out
    first = deployments(server)
    assert set(first) == {"nightly", "tiny-deployed"}
    tiny = first["tiny-deployed"]
    assert tiny["work_pool_name"] == "dpoflow-test" and "team-a" in tiny["tags"] and "dpoflow-managed" in tiny["tags"]
    assert tiny["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
    assert tiny["schedules"][0]["schedule"]["timezone"] == "Europe/Paris"
    schema = tiny["parameter_openapi_schema"]
    assert "overrides" in schema["properties"] and "PipelineConfigOverrides" in json.dumps(schema)

    ui_shows_the_deployment(server, "tiny-deployed")

    # A second sync is a no-op: same ids, no change, no extra scheduled runs.
    time.sleep(2)
    before = {name: len(scheduled_runs(server, d["id"])) for name, d in first.items()}
    out = dpoflow(server, "sync")
    assert "made 0 change(s)" in out
    again = deployments(server)
    assert {n: d["id"] for n, d in again.items()} == {n: d["id"] for n, d in first.items()}
    assert {name: len(scheduled_runs(server, d["id"])) for name, d in again.items()} == before

    # A run from the UI's Run button, with overrides, on a process worker.
    worker = subprocess.Popen(["prefect", "worker", "start", "--pool", "dpoflow-test", "--type", "process"],
                              env=server["env"], stdout=open(server["tmp"] / "worker.log", "w"),
                              stderr=subprocess.STDOUT)
    try:
        workdir = server["tmp"] / "work"
        state = run_to_the_end(server, tiny["id"], {"pipeline_name": "tiny-deployed", "file": "pipelines.yaml",
                                                    "overrides": {"workdir": str(workdir), "dpo": {"beta": 0.3}}})
        assert state == "COMPLETED", (server["tmp"] / "worker.log").read_text()[-4000:]
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    summary = json.loads((workdir / "runs" / "tiny-deployed" / "latest" / "summary.json").read_text())
    assert summary["overrides"] == [f'workdir="{workdir}"', "dpo.beta=0.3"]
    config = json.loads((workdir / "runs" / "tiny-deployed" / "latest" / "config.json").read_text())
    assert config["dpo"]["beta"] == 0.3 and config["dpo"]["max_steps"] == 6

    # A dry run shows a change and makes none; removing a pipeline prunes it and its scheduled runs.
    text = (server["project"] / "pipelines.yaml").read_text()
    (server["project"] / "pipelines.yaml").write_text(text.replace("tags: [team-a]", "tags: [team-b]"))
    out = dpoflow(server, "sync", "--dry-run")
    assert "update    tiny-deployed: tags:" in out and "(dry run)" in out
    assert "team-a" in deployments(server)["tiny-deployed"]["tags"]
    start = text.index("  nightly:")
    (server["project"] / "pipelines.yaml").write_text(text[:start] + text[text.index("  not-deployed:"):])
    out = dpoflow(server, "sync")
    assert "delete    nightly" in out
    left = deployments(server)
    assert set(left) == {"tiny-deployed"}
    assert scheduled_runs(server, first["nightly"]["id"]) == []


def test_serve_runs_a_ui_triggered_run_on_this_machine(server):
    """`dpoflow serve` (Prefect's serve): the deployments it registers take runs started through the
    API and execute them in the serving process, no work pool involved."""
    project = server["project"] / "served"
    project.mkdir()
    shutil.copy(server["project"] / "sentiment.jsonl", project / "sentiment.jsonl")
    (project / "pipelines.yaml").write_text(PIPELINES.split("  nightly:")[0].replace("tiny-deployed", "served")
                                            .replace("      work_pool: dpoflow-test\n", ""))
    env = {**server["env"], "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    serving = subprocess.Popen(["python", "-m", "dpoflow", "serve", "-f", str(project / "pipelines.yaml")], env=env,
                               stdout=open(server["tmp"] / "serve.log", "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while "served" not in deployments(server) and time.time() < deadline:
            time.sleep(1)
        served = deployments(server)["served"]
        workdir = server["tmp"] / "served-work"
        state = run_to_the_end(server, served["id"], {**served["parameters"],
                                                      "overrides": {"workdir": str(workdir)}})
        assert state == "COMPLETED", (server["tmp"] / "serve.log").read_text()[-4000:]
    finally:
        serving.terminate()
        serving.wait(timeout=30)
    assert (workdir / "runs" / "served" / "latest" / "summary.json").is_file()


def test_sync_refuses_to_run_without_a_server(server):
    env = {k: v for k, v in server["env"].items() if k != "PREFECT_API_URL"}
    proc = subprocess.run(["python", "-m", "dpoflow", "sync", "-f", str(server["project"] / "pipelines.yaml")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "PREFECT_API_URL" in proc.stderr


def ui_shows_the_deployment(server, name):
    """The Prefect UI's deployments page, rendered by headless Chromium (Debian's package), lists the
    deployment; the screenshot is kept in test-artifacts/."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is needed for the UI check (apt-get install chromium)")
    url = server["api"].removesuffix("/api") + "/deployments"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
             "--window-size=1400,900"]
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    artifacts = Path(__file__).resolve().parents[2] / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = artifacts / "prefect-ui-deployments.png"
    subprocess.run(flags + [f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert name in dom, dom[-2000:]
    assert shot.stat().st_size > 10_000
