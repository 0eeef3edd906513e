"""Prefect's temporary server started at the top of a command (dpoflow/app/tempserver.py): it boots in a
background thread, the flow run is recorded in it, Prefect starts no second one, it stops with the
process, and with an API configured nothing is started."""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import pytest

from dpoflow.app import tempserver
from dpoflow.base.runtime import PREFECT_DEFAULTS  # as the CLI sets them: a loaded machine boots the server slowly

SCRIPT = textwrap.dedent("""
    import json, os, sys
    from dpoflow.app import tempserver

    boot = tempserver.start()          # before the flow's imports, as `dpoflow run` does
    assert tempserver.start() is boot  # once per process

    from prefect import flow, task
    from prefect.artifacts import create_markdown_artifact

    def children():
        return open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split()

    @task(persist_result=True, result_serializer="json", cache_key_fn=lambda ctx, params: "k-" + params["x"])
    def stage(x):
        return {"x": x}

    @flow(name="tempserver-test")
    def pipeline():
        from prefect.settings import get_current_settings

        stage("a")
        state = stage("a", return_state=True)  # second call: from the cache
        create_markdown_artifact("# done", key="tempserver-test")
        return state.name, get_current_settings().flows.heartbeat_frequency, children()

    with tempserver.serving(boot):  # waits for the server
        second_call, heartbeat, during = pipeline()

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort
    from prefect.server.api.server import SubprocessASGIServer
    import time
    with get_client(sync_client=True) as client:
        api_url = client.api_url
        runs = client.read_flow_runs(limit=10, sort=FlowRunSort.START_TIME_DESC)
        for _ in range(100):  # task runs are recorded from events, a moment later
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[runs[0].id])),
                                          limit=10, sort=TaskRunSort.EXPECTED_START_TIME_DESC)
            if len(tasks) == 2 and all(t.state and t.state.is_final() for t in tasks):
                break
            time.sleep(0.1)
        artifacts = client.request("POST", "/artifacts/filter", json={"limit": 5, "sort": "CREATED_DESC"}).json()
    server = boot.server
    print("RESULT " + json.dumps({
        "api_url": str(api_url).rstrip("/"), "server_url": server.api_url, "pid": server.server_process.pid,
        "instances": [id(s) for s in SubprocessASGIServer._instances.values()], "server": id(server),
        "children": during, "runs": [r.state.name for r in runs], "tasks": sorted(t.state.name for t in tasks),
        "second_call": second_call, "heartbeat": heartbeat, "artifacts": [a["key"] for a in artifacts],
        "env_api_url": os.environ.get("PREFECT_API_URL")}))
""")


def test_run_records_in_the_background_started_server_which_stops_with_the_process(tmp_path, repo):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(repo), **PREFECT_DEFAULTS,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    # Prefect's own client used the instance the thread started, and no other
    assert result["api_url"] == result["server_url"]
    assert result["instances"] == [result["server"]]
    assert result["children"] == [str(result["pid"])]
    assert result["env_api_url"] is None  # nothing configured behind Prefect's back
    assert result["runs"] == ["Completed"]
    assert result["tasks"] == ["Cached", "Completed"] and result["second_call"] == "Cached"
    assert result["artifacts"] == ["tempserver-test"]
    assert result["heartbeat"] is None  # no one could ever read them
    output = proc.stderr + proc.stdout
    assert output.count("Starting temporary server") == 1
    assert "Stopping temporary server" in output
    assert "View at" not in output  # the temporary server serves no UI
    assert (tmp_path / "prefect" / "prefect.db").is_file()  # Prefect's own local database
    # stopped at exit
    assert not os.path.exists(f"/proc/{result['pid']}") or "zombie" in open(f"/proc/{result['pid']}/status").read()


def test_a_startup_error_is_raised_at_the_flow_call_and_nothing_is_left_running(tmp_path, repo):
    script = textwrap.dedent("""
        import os
        from dpoflow.app import tempserver
        from prefect.server.api.server import SubprocessASGIServer

        def fail(self, timeout=None):
            raise RuntimeError("no port")

        SubprocessASGIServer.start = fail
        boot = tempserver.start()
        try:
            with tempserver.serving(boot):
                raise AssertionError("the flow was called")
        except RuntimeError as e:
            print("RAISED", e)
    """)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(repo), **PREFECT_DEFAULTS}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "RAISED no port" in proc.stdout


def test_the_server_process_is_launched_before_this_process_imports_prefects_server(tmp_path, repo):
    """The point of starting it early: its boot (importing Prefect's server, opening the database)
    overlaps this process's own import of Prefect's server module, not only what comes after it. If
    Prefect's start() then fails, the launched process is stopped all the same."""
    script = textwrap.dedent("""
        import sys
        from dpoflow.app import tempserver

        launch = tempserver.launch_server
        seen = []

        def watched(port):
            seen.append("prefect.server.api.server" in sys.modules)
            return launch(port)

        tempserver.launch_server = watched
        boot = tempserver.start()
        boot.join()
        process = boot.server.server_process
        assert process.poll() is None  # this launched process is the one Prefect started up and waited for
        print("IMPORTED-FIRST", seen, boot.error)

        port = tempserver.free_port()
        failing = tempserver._guarded_server_class()(port)  # another instance (one per port argument)
        failing.launched = launched = launch(port)
        failing.stop()  # as at exit when start() failed before it took the process up
        print("STOPPED", failing.launched is None, launched.poll() is not None)
    """)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(repo), **PREFECT_DEFAULTS}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "IMPORTED-FIRST [False] None" in proc.stdout
    assert "STOPPED True True" in proc.stdout


def test_a_command_that_fails_before_the_flow_stops_the_server(tmp_path, repo):
    """The boot is still underway when the command exits: the server is stopped all the same."""
    script = textwrap.dedent("""
        import os
        from dpoflow.app import tempserver
        tempserver.start()
        raise SystemExit(3)
    """)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(repo), **PREFECT_DEFAULTS}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    output = proc.stderr + proc.stdout
    assert "Stopping temporary server" in output
    port = int(re.search(r"Starting temporary server on http://127.0.0.1:(\d+)", output)[1])
    with pytest.raises(OSError):  # nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_nothing_is_started_or_changed_when_an_api_is_configured():
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert not tempserver.needs_temporary_server()
        assert tempserver.start() is None
        with tempserver.serving(None):
            assert get_current_settings().flows.heartbeat_frequency == 180  # Prefect's default


def test_a_configured_heartbeat_is_kept_with_the_temporary_server():
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    class Ready:
        def wait(self):
            pass

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 60}):
        with tempserver.serving(Ready()):
            assert get_current_settings().flows.heartbeat_frequency == 60


@pytest.mark.parametrize("where", ["env", "profile"])
def test_with_an_api_in_the_env_or_the_profile_nothing_is_started(tmp_path, repo, where):
    home = tmp_path / "prefect"
    home.mkdir()
    env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONPATH": str(repo), **PREFECT_DEFAULTS}
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_PROFILE", None)
    if where == "env":
        env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"
    else:
        (home / "profiles.toml").write_text('active = "remote"\n\n[profiles.remote]\n'
                                            'PREFECT_API_URL = "http://127.0.0.1:9/api"\n')
    script = textwrap.dedent("""
        import os, sys, threading
        from dpoflow.app import tempserver
        boot = tempserver.start()
        with tempserver.serving(boot):
            pass
        children = open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split()
        from prefect.settings import get_current_settings
        print(boot, children, threading.active_count(), "prefect.server.api.server" in sys.modules,
              get_current_settings().api.url)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["None", "[]", "1", "False", "http://127.0.0.1:9/api"]
    assert "Starting temporary server" not in proc.stderr
