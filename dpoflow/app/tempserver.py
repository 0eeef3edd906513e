"""Prefect's temporary API server, started at the top of a command instead of inside the flow.

With no API configured, Prefect starts its temporary server (`SubprocessASGIServer`, one per process)
when the flow first needs the API, after every import, and waits for it to boot (its process imports
Prefect's server and opens the database: several seconds). `start()` launches that server's process
first thing, before this process imports Prefect's server module (itself seconds), so the two boot side
by side; a thread then waits for its health check as Prefect's `start()` does, on the very instance
Prefect asks for later. `serving()` waits for it before the flow call, where Prefect's own `start()`
finds it running and returns at once.

The server runs in a session of its own, so a terminal's Ctrl-C reaches only the command, which can
still record the interrupted run before stopping the server; and it stops by itself when the command
is gone (killed with SIGKILL, say) rather than staying behind as an orphan."""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import os
import socket
import subprocess
import threading

from dpoflow.base import tethered


def needs_temporary_server() -> bool:
    """No API URL in Prefect's settings (any source) and ephemeral mode allowed (the default)."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    return not settings.api.url and settings.server.ephemeral.enabled


class Boot(threading.Thread):
    """`server.start()` (launch the child, wait for its health check) under the caller's settings."""

    def __init__(self, server):
        super().__init__(name="prefect-temporary-server", daemon=True)
        self.server, self.error, self._context = server, None, contextvars.copy_context()

    def run(self) -> None:
        try:
            self._context.run(self.server.start)
        except BaseException as e:  # raised in the main thread by wait()
            self.error = e

    def wait(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error

    def stop_at_exit(self) -> None:
        # A command failing before its flow call may exit before Prefect registers its exit handler.
        self.join()
        self.server.stop()


def launch_server(port: int) -> subprocess.Popen:
    """Prefect's temporary server process as Prefect 3.8 launches it (same uvicorn arguments and
    environment, this process's settings passed on), in its own session and tethered to this process
    (dpoflow.base.tethered). Imports only Prefect's settings, not its server."""
    import prefect
    from prefect.settings import get_current_settings

    uvicorn = ["--app-dir", str(prefect.__module_path__.parent), "--factory", "prefect.server.api.server:create_app",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           **get_current_settings().to_environment_variables(exclude_unset=True)}
    return subprocess.Popen(tethered.command("uvicorn", *uvicorn), env=env, start_new_session=True)


def free_port() -> int:
    """A port nothing listens on now (the system's pick). Taken in the meantime, the server exits with
    code 3 and Prefect's `start()` retries on another port, as with its own pick."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _guarded_server_class():
    from prefect.server.api.server import SubprocessASGIServer

    class GuardedServer(SubprocessASGIServer):
        """Prefect's temporary server whose process may already be running: `launched` (on `port`) is
        what Prefect's `start()` gets on its first launch; a retry launches anew (launch_server)."""

        launched: subprocess.Popen | None = None

        def _run_uvicorn_command(self) -> subprocess.Popen:
            process, self.launched = self.launched, None
            return process if process is not None else launch_server(self.port)

        def stop(self) -> None:
            if self.launched is not None and self.server_process is None:  # start() never took it up
                self.server_process, self.launched = self.launched, None
            super().stop()

    return GuardedServer


_boot: Boot | None = None


def start() -> Boot | None:
    """Start booting the temporary server if runs need one (once per process); None otherwise."""
    global _boot
    if _boot is None and needs_temporary_server():
        port = free_port()
        launched = launch_server(port)  # boots while this process imports what follows
        # Imported here, not in the boot thread: importing Prefect from two threads at once (the
        # flow module's import) risks import-lock deadlocks. prefect.main first: Prefect's logging is
        # set up for the start message.
        import prefect.main  # noqa: F401  (what `from prefect import flow` runs)
        # Made with no port, as Prefect's own SubprocessASGIServer() later asks for it: the same instance
        # (one per port argument). start() keeps a port already set.
        server = _guarded_server_class()()
        server.port, server.launched = port, launched
        _boot = Boot(server)
        atexit.register(_boot.stop_at_exit)
        _boot.start()
    return _boot


@contextlib.contextmanager
def serving(boot: Boot | None):
    """Around the flow call: wait for the server (raising its startup error); no flow-run heartbeats
    unless configured: nothing reads them, and their thread holds up each run's end by up to 1 s."""
    if boot is None:
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    boot.wait()
    with temporary_settings(set_defaults={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
