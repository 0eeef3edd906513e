"""Prefect's temporary local API server, started at the top of a command instead of inside the flow.

With no Prefect API configured (no PREFECT_API_URL in the environment, profile or prefect.toml),
Prefect starts a temporary local server the first time a flow needs the API: a `uvicorn` child
process running Prefect's own API app on the local database (~/.prefect/prefect.db). Prefect does
that inside the flow call, after every import, and then waits for it: 3-4 s on 2 cores, during which
the command does nothing else. Starting the server the way Prefect does costs the command another
1.5 s: importing `prefect.server.api.server` (SQLAlchemy, FastAPI, every API route) only to reach the
class that launches the child.

`start()` launches the same child process, with the same arguments and environment as Prefect's
`SubprocessASGIServer`, before the command imports the flow, torch and the rest, so that the child
boots on the second core while the command imports. `wait()` then waits for the server's health
check and points Prefect at it (PREFECT_API_URL, through Prefect's own settings refresh), exactly as
if the user had started a local server: flow runs, task runs, logs, artifacts and events are recorded
in the same database. The server stops when the process exits, as Prefect's does.

With an API configured (a Prefect server or Cloud), none of this happens: `start()` returns None.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

# Prefect's SubprocessASGIServer picks its port in the same range, in the same way.
PORTS = range(8000, 9000)
# What Prefect's SubprocessASGIServer sets for its child: no UI, ephemeral mode (no background
# services), final (no second app built in the process).
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


def needs_temporary_server() -> bool:
    """True when flow runs would go to a temporary local server: no API URL in Prefect's settings
    (any source) and ephemeral mode allowed (Prefect's default profile)."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    return not settings.api.url and settings.server.ephemeral.enabled


def _free_port() -> int:
    for _ in range(10):
        port = random.choice(PORTS)
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                time.sleep(random.uniform(0.1, 0.5))
    raise RuntimeError("no free port for the temporary Prefect server")


class TemporaryServer:
    """One temporary Prefect API server child process (see the module docstring)."""

    def __init__(self, env: dict[str, str]):
        # Prefect's package folder, found without importing Prefect (see start()).
        self._app_dir = str(Path(importlib.util.find_spec("prefect").origin).resolve().parent.parent)
        self._env = {**env, **SERVER_ENV}
        self.port = _free_port()
        self.process: subprocess.Popen | None = self._launch()
        self.ready = False
        atexit.register(self.stop)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _launch(self) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", self._app_dir, "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env=self._env,
        )

    def announce(self) -> None:
        """Prefect's own message when it starts its temporary server."""
        import prefect.main  # noqa: F401  (sets up Prefect's logging, as `from prefect import flow` does)
        from prefect.logging import get_logger

        get_logger().info(f"Starting temporary server on http://127.0.0.1:{self.port}\nSee "
                          "https://docs.prefect.io/v3/concepts/server#how-to-guides for more information on "
                          "running a dedicated Prefect server.")

    def discard(self) -> None:
        """Stop a server launched ahead of Prefect's settings that turned out not to be needed."""
        atexit.unregister(self.stop)
        self.process.kill()
        self.process.wait()
        self.process = None

    def wait(self, timeout: float | None = None) -> str:
        """Block until the server answers its health check, then make it this process's Prefect API
        (and its child processes'). Returns the API URL."""
        if self.ready:
            return self.api_url
        import httpx
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        deadline = time.monotonic() + (timeout or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        with httpx.Client() as client:
            while True:
                if self.process.poll() == 3:  # uvicorn's exit code when the port was taken meanwhile
                    self.port = _free_port()
                    self.process = self._launch()
                    self.announce()
                elif self.process.poll() is not None:
                    raise RuntimeError(f"the temporary Prefect server exited with code {self.process.returncode}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("Timed out while attempting to connect to the temporary Prefect API server")
                time.sleep(0.05)
        use_api(self.api_url, ui=False)
        self.ready = True
        return self.api_url

    def stop(self) -> None:
        if self.process is None:
            return
        from prefect.logging import get_logger

        get_logger().info(f"Stopping temporary server on http://127.0.0.1:{self.port}")
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


@contextlib.contextmanager
def serving(server: TemporaryServer | None):
    """Around a command's flow call: waits for the temporary server (if there is one) and, while the
    flow runs against it, sends no flow-run heartbeats unless configured. Heartbeats let a lasting
    server notice a crashed run; this one ends with the process, so nothing ever reads them, and
    Prefect's heartbeat thread (1 s sleeps) holds up the end of every run by up to 1 s."""
    if server is None:
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    server.wait()
    with temporary_settings(set_defaults={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def use_api(url: str, ui: bool = True) -> None:
    """Point Prefect in this process (every thread: the global settings context is rebuilt from the
    environment, Prefect's own mechanism after plugins set variables) and in its children at `url`.
    `ui=False`: the server serves no UI (the temporary one), so no "View at" links to it are printed."""
    from prefect.context import refresh_global_settings_context

    os.environ["PREFECT_API_URL"] = url
    if not ui:
        os.environ.setdefault("PREFECT_UI_URL", "")
    refresh_global_settings_context()


_server: TemporaryServer | None = None


def start() -> TemporaryServer | None:
    """Start the temporary server in the background if runs need one (once per process); None when a
    Prefect API is configured.

    In a fresh process (Prefect not imported yet) with no PREFECT_API_URL in the environment, the
    server is launched first and Prefect's settings (profile, prefect.toml, .env: 0.7 s to import)
    confirm it afterwards; if they name an API after all, the child is killed before it has done
    anything but import. Launched that early it reads the same settings sources itself; once Prefect
    is imported, the process's own settings (temporary settings included) are handed to it, as
    Prefect does."""
    global _server
    if _server is not None and _server.process is not None:
        return _server
    early = None
    if "prefect" not in sys.modules and not os.environ.get("PREFECT_API_URL"):
        early = TemporaryServer(dict(os.environ))
    if not needs_temporary_server():
        if early is not None:
            early.discard()
        return None
    if early is None:
        from prefect.settings import get_current_settings

        early = TemporaryServer({**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True)})
    _server = early
    _server.announce()
    return _server
