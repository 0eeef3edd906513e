"""The temporary Prefect server started at the top of a command (dpoflow/tempserver.py): it boots in the
background, the flow run is recorded in it like in Prefect's own temporary server, it stops with the
process, and with an API configured nothing is started."""

import json
import os
import subprocess
import sys
import textwrap

from dpoflow import tempserver

SCRIPT = textwrap.dedent("""
    import json, os, sys
    from dpoflow import tempserver

    server = tempserver.start()          # before the flow's imports, as `dpoflow run` does
    assert tempserver.start() is server  # once per process

    from prefect import flow, task
    from prefect.artifacts import create_markdown_artifact

    @task(persist_result=True, result_serializer="json", cache_key_fn=lambda ctx, params: "k-" + params["x"])
    def stage(x):
        return {"x": x}

    @flow(name="tempserver-test")
    def pipeline():
        from prefect.settings import get_current_settings

        stage("a")
        state = stage("a", return_state=True)  # second call: from the cache
        create_markdown_artifact("# done", key="tempserver-test")
        return state.name, get_current_settings().flows.heartbeat_frequency

    with tempserver.serving(server):  # waits for the server
        second_call, heartbeat = pipeline()

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort
    import time
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=10, sort=FlowRunSort.START_TIME_DESC)
        for _ in range(100):  # task runs are recorded from events, a moment later
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[runs[0].id])),
                                          limit=10, sort=TaskRunSort.EXPECTED_START_TIME_DESC)
            if len(tasks) == 2 and all(t.state and t.state.is_final() for t in tasks):
                break
            time.sleep(0.1)
    import httpx
    artifact = httpx.post(server.api_url + "/artifacts/filter", json={"limit": 1, "sort": "CREATED_DESC"}).json()[0]
    print("RESULT " + json.dumps({
        "api_url": os.environ["PREFECT_API_URL"], "server_url": server.api_url, "pid": server.process.pid,
        "runs": [r.state.name for r in runs], "tasks": sorted(t.state.name for t in tasks),
        "second_call": second_call, "heartbeat": heartbeat, "artifact": artifact["key"],
        "prefect_started_its_own": "prefect.server.api.server" in sys.modules}))
""")


def test_run_records_in_the_background_started_server_which_stops_with_the_process(tmp_path, repo):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(repo),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["api_url"] == result["server_url"]
    assert result["runs"] == ["Completed"]
    assert result["tasks"] == ["Cached", "Completed"] and result["second_call"] == "Cached"
    assert result["artifact"] == "tempserver-test"
    assert result["heartbeat"] is None  # no one could ever read them
    assert not result["prefect_started_its_own"]
    assert "Starting temporary server" in proc.stderr + proc.stdout
    assert "View at" not in proc.stderr + proc.stdout  # the temporary server serves no UI
    assert (tmp_path / "prefect" / "prefect.db").is_file()  # Prefect's own local database
    # stopped at exit
    assert not os.path.exists(f"/proc/{result['pid']}") or "zombie" in open(f"/proc/{result['pid']}/status").read()


def test_nothing_is_started_or_changed_when_an_api_is_configured():
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert not tempserver.needs_temporary_server()
        assert tempserver.start() is None
        with tempserver.serving(None):
            assert get_current_settings().flows.heartbeat_frequency == 180  # Prefect's default


def test_a_configured_heartbeat_is_kept_with_the_temporary_server(monkeypatch):
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    class Ready:
        def wait(self):
            pass

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 60}):
        with tempserver.serving(Ready()):
            assert get_current_settings().flows.heartbeat_frequency == 60


def test_an_api_named_only_in_the_prefect_profile_is_used_and_no_server_is_left_running(tmp_path, repo):
    """A fresh process launches the server before importing Prefect; Prefect's settings (here the
    profile) then name an API, and the launched child is gone before start() returns."""
    home = tmp_path / "prefect"
    home.mkdir()
    (home / "profiles.toml").write_text('active = "remote"\n\n[profiles.remote]\n'
                                        'PREFECT_API_URL = "http://127.0.0.1:9/api"\n')
    script = textwrap.dedent("""
        import os
        from dpoflow import tempserver
        server = tempserver.start()
        children = open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split()
        from prefect.settings import get_current_settings
        print(server, children, get_current_settings().api.url)
    """)
    env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONPATH": str(repo)}
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_PROFILE", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["None", "[]", "http://127.0.0.1:9/api"]
    assert "Starting temporary server" not in proc.stderr
