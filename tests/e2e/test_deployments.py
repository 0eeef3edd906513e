"""Production journeys against a real Prefect server on 127.0.0.1, driven the way operators drive it:
the dpoflow and prefect CLIs in subprocesses, and the REST calls the UI makes.

- Work pools: `dpoflow sync` creates a scheduled deployment; a second sync changes nothing; a changed
  cron and a schedule switched off in the UI are put back by sync exactly as its dry run said;
  `prefect deployment ls` lists it; removing the pipeline prunes it with its scheduled runs.
- One machine: `dpoflow serve` runs a schedule tick, a plain Run (no parameters) and `prefect
  deployment run`, while `dpoflow sync` of the same file beside it changes and prunes nothing.
- Workers: a process worker runs a deployment that clones its code from a git remote; the run's work
  outlives the clone, so the second run (started by the command Prefect's Docker and Kubernetes
  workers give the image) is fully cached and the exports are kept.
"""

import json
import os
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

FAST = """
    cpu_threads: 1
    data:
      sources: [sentiment.jsonl]
      heldout_fraction: 0.12
      decontamination: {ngram: 16}
    dpo: {learning_rate: 1.0e-3, max_steps: 6, per_device_batch_size: 8, gradient_accumulation_steps: 1,
          max_length: 128}
    evaluate: {limit: 10, gate: {max_drop: 100}}
    export: {formats: [adapter]}"""

PIPELINES = f"""
pipelines:
  nightly:{FAST}
    deploy:
      enabled: true
      work_pool: dpoflow-test
      tags: [team-a]
      schedules: [{{cron: "0 3 * * *", timezone: Europe/Paris}}]
  hourly:
    data: {{sources: [sentiment.jsonl]}}
    deploy:
      enabled: true
      work_pool: dpoflow-test
      schedules: [{{interval_seconds: 3600}}]
  not-deployed:
    data: {{sources: [sentiment.jsonl]}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git(cwd, *args):
    subprocess.run(["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", *args], cwd=cwd, check=True,
                   capture_output=True)


def new_project(server, name: str, pipelines: str) -> Path:
    """A git checkout holding pipelines.yaml and the demo data (sync reads the commit from it)."""
    project = server["tmp"] / name
    project.mkdir()
    shutil.copy(server["repo"] / "data" / "demo" / "sentiment.jsonl", project / "sentiment.jsonl")
    (project / "pipelines.yaml").write_text(pipelines)
    git(project, "init", "-q", "-b", "main")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "pipelines")
    return project


@pytest.fixture(scope="module")
def server(tmp_path_factory, repo):
    tmp = tmp_path_factory.mktemp("deploy")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_UI_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "5", "PREFECT_RUNNER_POLL_FREQUENCY": "1", "OMP_NUM_THREADS": "1",
           "PREFECT_LOGGING_LEVEL": "INFO",
           # the UI test reads its pages; an in-process CLI test of the same worker may have turned it off
           # in os.environ (the CLI's quiet defaults, dpoflow.base.runtime)
           "PREFECT_UI_ENABLED": "true"}
    env.pop("CI", None)  # sync refuses pool deployments without a repository on CI; tests set CI on purpose
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
    subprocess.run(["prefect", "work-pool", "create", "dpoflow-test", "--type", "process"], env=env, check=True,
                   capture_output=True, timeout=120)
    yield {"env": env, "api": api, "tmp": tmp, "repo": repo}
    proc.terminate()
    proc.wait(timeout=30)


def dpoflow(server, project, *args, expect=0, env=None):
    proc = subprocess.run(["python", "-m", "dpoflow", *args, "-f", str(project / "pipelines.yaml")],
                          env=env or server["env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


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
    return response.json() if response.content else None


def deployments(server) -> dict:
    return {d["name"]: d for d in api(server, "POST", "/deployments/filter", json={})}


def flow_runs(server, deployment_id, states=None) -> list:
    body = {"deployments": {"id": {"any_": [deployment_id]}}}
    if states:
        body["flow_runs"] = {"state": {"type": {"any_": states}}}
    return api(server, "POST", "/flow_runs/filter", json=body)


def wait_final(server, run_id, log: Path, timeout=420) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = api(server, "GET", f"/flow_runs/{run_id}")
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            assert run["state"]["type"] == "COMPLETED", run["state"]["message"] + "\n" + log.read_text()[-4000:]
            return run
        time.sleep(2)
    pytest.fail(f"run {run_id} did not finish: {run['state']}\n" + log.read_text()[-4000:])


def sync_lines(proc) -> list[str]:
    return [line for line in proc.stdout.splitlines() if not line.startswith(("made ", "would make "))]


def test_sync_keeps_work_pool_deployments_equal_to_the_file(server):
    project = new_project(server, "synced", PIPELINES.replace("work_pool: dpoflow-test", "work_pool: gpu-pool", 1))
    proc = dpoflow(server, project, "sync", expect=2)
    assert proc.stderr.strip().splitlines() == [
        "dpoflow sync: work pool 'gpu-pool' (deploy.work_pool of nightly) does not exist: create it with "
        "`prefect work-pool create gpu-pool --type process` (or docker, kubernetes)"]
    assert deployments(server) == {}  # nothing half-synced
    (project / "pipelines.yaml").write_text(PIPELINES)

    out = dpoflow(server, project, "sync").stdout
    assert "create    nightly" in out and "create    hourly" in out and "not-deployed" not in out
    first = deployments(server)
    assert set(first) == {"nightly", "hourly"}
    nightly = first["nightly"]
    assert nightly["work_pool_name"] == "dpoflow-test" and {"team-a", "dpoflow-managed"} <= set(nightly["tags"])
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
    assert nightly["schedules"][0]["schedule"]["timezone"] == "Europe/Paris"
    assert nightly["global_concurrency_limit"]["limit"] == 1  # the default: one run of a pipeline at a time
    assert nightly["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    form_is_typed_and_described(nightly["parameter_openapi_schema"])

    ls = subprocess.run(["prefect", "deployment", "ls"], env=server["env"], capture_output=True, text=True,
                        timeout=120)
    assert ls.returncode == 0 and "dpoflow-deployment/nightly" in ls.stdout, ls.stdout + ls.stderr
    ui_shows_the_deployment(server, "nightly")

    # A second sync is a no-op: same ids, no change, the same scheduled runs.
    time.sleep(6)  # one scheduler loop: the schedules' runs exist
    before = {n: sorted(r["id"] for r in flow_runs(server, d["id"], ["SCHEDULED"])) for n, d in first.items()}
    assert before["hourly"], "the schedule created no runs"
    assert "made 0 change(s)" in dpoflow(server, project, "sync").stdout
    again = deployments(server)
    assert {n: d["id"] for n, d in again.items()} == {n: d["id"] for n, d in first.items()}
    assert {n: sorted(r["id"] for r in flow_runs(server, d["id"], ["SCHEDULED"])) for n, d in again.items()} == before

    # A changed cron: the dry run's plan is what sync then does, and the server has the new schedule.
    text = (project / "pipelines.yaml").read_text()
    (project / "pipelines.yaml").write_text(text.replace('cron: "0 3 * * *"', 'cron: "30 4 * * 1"'))
    planned = dpoflow(server, project, "sync", "--dry-run")
    assert deployments(server)["nightly"]["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
    done = dpoflow(server, project, "sync")
    assert sync_lines(planned) == sync_lines(done) and "update    nightly: schedules:" in done.stdout
    assert deployments(server)["nightly"]["schedules"][0]["schedule"]["cron"] == "30 4 * * 1"
    assert "made 0 change(s)" in dpoflow(server, project, "sync").stdout

    # A schedule switched off in the UI: the file is the source of truth, and sync says so first.
    schedule = deployments(server)["nightly"]["schedules"][0]
    api(server, "PATCH", f"/deployments/{nightly['id']}/schedules/{schedule['id']}", json={"active": False})
    planned = dpoflow(server, project, "sync", "--dry-run")
    assert "'active': False" in planned.stdout and "'active': True" in planned.stdout
    assert sync_lines(planned) == sync_lines(dpoflow(server, project, "sync"))
    assert deployments(server)["nightly"]["schedules"][0]["active"] is True

    # A dry run changes nothing; removing a pipeline prunes it and its scheduled runs.
    text = (project / "pipelines.yaml").read_text()
    (project / "pipelines.yaml").write_text(text.replace("tags: [team-a]", "tags: [team-b]"))
    out = dpoflow(server, project, "sync", "--dry-run").stdout
    assert "update    nightly: tags:" in out and "(dry run)" in out
    assert "team-a" in deployments(server)["nightly"]["tags"]
    start = text.index("  hourly:")
    (project / "pipelines.yaml").write_text(text[:start] + text[text.index("  not-deployed:"):])
    assert "delete    hourly" in dpoflow(server, project, "sync").stdout
    assert set(deployments(server)) == {"nightly"}
    assert flow_runs(server, first["hourly"]["id"], ["SCHEDULED"]) == []


def form_is_typed_and_described(schema: dict) -> None:
    """The UI's run form: the pipeline is fixed, every override field says what it is and its default,
    and the config's constraints hold in the form too."""
    assert schema["properties"]["pipeline_name"]["enum"] == ["nightly"]
    assert schema["properties"]["pipeline_name"]["readOnly"] is True
    leaves = [(model, name, prop) for model, definition in schema["definitions"].items()
              for name, prop in definition.get("properties", {}).items()]
    assert len(leaves) > 90
    assert [f"{m}.{n}" for m, n, p in leaves if not p.get("description")] == []
    assert [f"{m}.{n}" for m, n, p in leaves if m.endswith("Overrides") and "$ref" not in json.dumps(p)
            and "Default:" not in p["description"] and n not in ("data",)] == []
    beta = schema["definitions"]["DPOSpecOverrides"]["properties"]["beta"]
    assert beta["anyOf"][0]["exclusiveMinimum"] == 0 and "Default: 0.1." in beta["description"]


def test_serve_runs_schedules_and_plain_runs_beside_sync(server):
    """`dpoflow serve` (Prefect's serve) runs the pool-less pipelines: a cron tick, the UI's plain Run
    and `prefect deployment run`, none with parameters. `dpoflow sync` of the same file beside it
    leaves its deployments alone, and each refuses a name the other owns."""
    pipelines = (f"pipelines:\n  served:{FAST}\n    deploy:\n      enabled: true\n"
                 f"      schedules: [{{cron: '* * * * *'}}]\n"
                 f"  pooled:{FAST}\n    deploy: {{enabled: true, work_pool: dpoflow-test}}\n")
    project = new_project(server, "served", pipelines)
    env = {**server["env"]}
    synced = dpoflow(server, project, "sync").stdout
    assert "create    pooled" in synced and "serve     served (no deploy.work_pool" in synced
    log = server["tmp"] / "serve.log"
    serving = subprocess.Popen(["python", "-m", "dpoflow", "serve", "-f", str(project / "pipelines.yaml")], env=env,
                               stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while "served" not in deployments(server) and time.time() < deadline:
            assert serving.poll() is None, log.read_text()[-3000:]
            time.sleep(1)
        before = deployments(server)
        served = before["served"]
        assert "dpoflow-served" in served["tags"] and "dpoflow-managed" not in served["tags"]
        assert served["entrypoint"] == "dpoflow.flows.deployed.deployed_pipeline"

        # sync beside serve: nothing changes, nothing is pruned.
        out = dpoflow(server, project, "sync").stdout
        assert "unchanged pooled" in out and "made 0 change(s)" in out
        after = deployments(server)
        assert {n: (d["id"], d["entrypoint"], d["schedules"], d["tags"]) for n, d in after.items()} == \
               {n: (d["id"], d["entrypoint"], d["schedules"], d["tags"]) for n, d in before.items()}

        # Each refuses the other's names, in one line, changing nothing.
        clash = new_project(server, "clash", pipelines.replace("work_pool: dpoflow-test", "").replace(
            "  served:", "  other:"))
        proc = dpoflow(server, clash, "serve", expect=2)
        assert proc.stderr.count("\n") == 1 and "dpoflow-deployment/pooled already exists, registered by " \
            "`dpoflow sync`" in proc.stderr
        assert deployments(server)["pooled"]["id"] == before["pooled"]["id"]

        # The cron's first tick: a scheduled run with no parameters completes.
        deadline = time.time() + 150
        while not flow_runs(server, served["id"], ["COMPLETED", "RUNNING", "PENDING", "FAILED", "CRASHED"]):
            assert time.time() < deadline, "no scheduled run started\n" + log.read_text()[-3000:]
            time.sleep(2)
        ticked = flow_runs(server, served["id"], ["COMPLETED", "RUNNING", "PENDING", "FAILED", "CRASHED"])[0]
        assert ticked["auto_scheduled"] is True
        wait_final(server, ticked["id"], log)

        # The UI's plain Run button: no parameters of its own.
        plain = api(server, "POST", f"/deployments/{served['id']}/create_flow_run", json={})
        run = wait_final(server, plain["id"], log)
        assert run["parameters"].get("overrides") in (None, {})
        # `prefect deployment run`, the documented trigger for new data.
        proc = subprocess.run(["prefect", "deployment", "run", "dpoflow-deployment/served"], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        triggered = [r for r in flow_runs(server, served["id"]) if not r["auto_scheduled"] and r["id"] != plain["id"]]
        assert len(triggered) == 1
        wait_final(server, triggered[0]["id"], log)
    finally:
        serving.terminate()
        serving.wait(timeout=30)

    summary = json.loads((project / ".dpoflow" / "runs" / "served" / "latest" / "summary.json").read_text())
    assert summary["overrides"] == []
    assert {row["status"] for row in summary["stages"]} == {"cached"}  # the same pipeline, run again
    artifacts = api(server, "POST", "/artifacts/filter",
                    json={"artifacts": {"flow_run_id": {"any_": [triggered[0]["id"]]}}})
    # On the run a user opens: the summary, the data report, the forgetting table and both charts.
    assert sorted(a["type"] for a in artifacts) == ["image", "image", "markdown", "markdown", "table"]
    assert all(a["data"].startswith("data:image/png;base64,") for a in artifacts if a["type"] == "image")


def test_a_process_worker_runs_cloned_code_and_keeps_the_work(server):
    """deploy.repository: workers clone the synced commit; the workdir is outside the clone, so a second
    run (started by the command Prefect's Docker and Kubernetes workers hand the image) is all cached."""
    remote = server["tmp"] / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(remote)], check=True)
    pipelines = (f"pipelines:\n  cloned:{FAST}\n    deploy:\n      enabled: true\n      work_pool: dpoflow-test\n"
                 f"      repository: {remote}\n")
    project = new_project(server, "cloned", pipelines)
    git(project, "remote", "add", "origin", str(remote))
    git(project, "push", "-q", "origin", "main")
    dpoflow(server, project, "sync")
    cloned = deployments(server)["cloned"]
    assert cloned["pull_steps"][0]["prefect.deployments.steps.git_clone"]["repository"] == str(remote)

    cache = server["tmp"] / "worker-cache"
    env = {**server["env"], "DPOFLOW_CACHE_DIR": str(cache)}
    log = server["tmp"] / "worker.log"
    worker = subprocess.Popen(["prefect", "worker", "start", "--pool", "dpoflow-test", "--type", "process"],
                              env=env, cwd=server["tmp"], stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        first = api(server, "POST", f"/deployments/{cloned['id']}/create_flow_run", json={})
        wait_final(server, first["id"], log)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    workdir = cache / "workdir"
    summary = json.loads((workdir / "runs" / "cloned" / "latest" / "summary.json").read_text())
    assert {row["status"] for row in summary["stages"]} == {"ran"}
    adapter = Path(summary["exports"]["adapter"])
    assert adapter.is_relative_to(workdir) and adapter.is_dir()

    # The image's entrypoint with the command Prefect's Docker worker (and Kubernetes' `args`) sends.
    from prefect.workers.base import BaseJobConfiguration

    command = shlex.split(BaseJobConfiguration._base_flow_run_command())
    second = api(server, "POST", f"/deployments/{cloned['id']}/create_flow_run", json={})
    entry = subprocess.run(["sh", str(server["repo"] / "docker" / "entrypoint.sh"), *command],
                           env={**env, "PREFECT__FLOW_RUN_ID": second["id"]}, cwd=server["tmp"],
                           capture_output=True, text=True, timeout=400)
    assert entry.returncode == 0, entry.stdout[-3000:] + entry.stderr[-3000:]
    assert api(server, "GET", f"/flow_runs/{second['id']}")["state"]["type"] == "COMPLETED"
    again = json.loads((workdir / "runs" / "cloned" / "latest" / "summary.json").read_text())
    assert again["flow_run"] != summary["flow_run"]
    assert {row["status"] for row in again["stages"]} == {"cached"}
    assert adapter.is_dir()

    # From CI, a pool deployment without a repository would point workers at the runner's checkout.
    (project / "pipelines.yaml").write_text(pipelines.replace(f"      repository: {remote}\n", ""))
    proc = dpoflow(server, project, "sync", expect=2, env={**server["env"], "CI": "true"})
    assert "deploy.work_pool without deploy.repository" in proc.stderr
    assert deployments(server)["cloned"]["pull_steps"] == cloned["pull_steps"]


def test_bad_inputs_are_one_line_and_change_nothing(server, tmp_path):
    project = new_project(server, "bad", PIPELINES)
    unreachable = {**server["env"], "PREFECT_API_URL": f"http://127.0.0.1:{_free_port()}/api"}
    served = new_project(server, "bad-served", PIPELINES.replace("      work_pool: dpoflow-test\n", ""))
    for command, where in (("sync", project), ("serve", served)):
        proc = dpoflow(server, where, command, expect=2, env=unreachable)
        assert proc.stderr.count("\n") == 1 and "cannot reach the Prefect server at" in proc.stderr, proc.stderr
    no_url = {k: v for k, v in server["env"].items() if k != "PREFECT_API_URL"}
    assert "PREFECT_API_URL" in dpoflow(server, project, "sync", expect=2, env=no_url).stderr
    proc = dpoflow(server, project, "serve", expect=2)  # every pipeline there has a work pool
    assert "no pipeline has deploy.enabled without a deploy.work_pool" in proc.stderr

    # A run whose overrides break the config fails with the problem named, not a traceback of ours.
    before = deployments(server)
    nightly = before.get("nightly")
    if nightly is None:
        dpoflow(server, project, "sync")
        nightly = deployments(server)["nightly"]
    response = httpx.post(f"{server['api']}/deployments/{nightly['id']}/create_flow_run",
                          json={"parameters": {"overrides": {"dpo": {"beta": -1}}}}, timeout=30)
    assert response.status_code == 409 and "beta" in response.text  # the form's constraint, enforced
    response = httpx.post(f"{server['api']}/deployments/{nightly['id']}/create_flow_run",
                          json={"parameters": {"pipeline_name": "other"}}, timeout=30)
    assert response.status_code == 409


def test_a_failed_run_notifies_through_the_documented_automation(server):
    """docs/automations/notify-on-failure.yaml, created with Prefect's CLI as the docs say, sends a
    notification when a run fails; the run fails on overrides the config refuses, named in one line."""
    import http.server
    import threading

    received = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append(self.rfile.read(int(self.headers["Content-Length"])).decode())
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    hook = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    block = subprocess.run(["python", "-c", (
        "from prefect.blocks.notifications import CustomWebhookNotificationBlock as B; "
        f"print(B(name='dpoflow', url='http://127.0.0.1:{hook.server_port}/hook', "
        "json_data={'text': '{{subject}}: {{body}}'}).save('dpoflow-alerts', overwrite=True))")],
        env=server["env"], capture_output=True, text=True, timeout=120)
    assert block.returncode == 0, block.stderr
    spec = (server["repo"] / "docs" / "automations" / "notify-on-failure.yaml").read_text()
    automation = server["tmp"] / "automation.yaml"
    automation.write_text(spec.replace("BLOCK_DOCUMENT_ID", block.stdout.strip()))
    created = subprocess.run(["prefect", "automation", "create", "--from-file", str(automation)], env=server["env"],
                             capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stdout + created.stderr

    project = new_project(server, "failing", f"pipelines:\n  failing:{FAST}\n    deploy: {{enabled: true, "
                                             f"work_pool: dpoflow-test}}\n")
    dpoflow(server, project, "sync")
    failing = deployments(server)["failing"]
    log = server["tmp"] / "failing-worker.log"
    worker = subprocess.Popen(["prefect", "worker", "start", "--pool", "dpoflow-test", "--type", "process"],
                              env=server["env"], stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        run = api(server, "POST", f"/deployments/{failing['id']}/create_flow_run",
                  json={"parameters": {"overrides": {"dpo": {"loss_weights": [1.0, 0.5]}}}})
        deadline = time.time() + 300
        while (state := api(server, "GET", f"/flow_runs/{run['id']}")["state"])["type"] not in ("FAILED", "CRASHED",
                                                                                              "COMPLETED"):
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(2)
        assert state["type"] == "FAILED" and "invalid config" in state["message"] and "loss_weights" in \
            state["message"], state
        deadline = time.time() + 120
        while not received and time.time() < deadline:
            time.sleep(2)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        hook.shutdown()
    assert received and "failing" in received[0] and "Failed" in received[0], received


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
