"""Process settings applied before heavy imports: quiet, offline-friendly Prefect defaults and CPU threads."""

from __future__ import annotations

import atexit
import gc
import os
from pathlib import Path

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The temporary local server takes 8-15 s to start the first time, longer on a loaded machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_UI_ENABLED": "false",
}


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C inside a stage that keeps resumable state; the message says where it stopped and what
    was kept ("dpo at step 7; checkpoint kept: ..."). A KeyboardInterrupt, so Prefect and every
    caller treat it as the interrupt it is."""


def configure_environment() -> None:
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def cache_root() -> Path:
    """What dpoflow keeps between runs on this machine (compile caches, a worker's workdir):
    DPOFLOW_CACHE_DIR (the Docker image points it at the /data volume), else ~/.cache/dpoflow."""
    return Path(os.environ.get("DPOFLOW_CACHE_DIR") or Path.home() / ".cache" / "dpoflow")


def set_cpu_threads(threads: int | None) -> None:
    """Tiny models on few cores run many times faster single-threaded (no OpenMP contention)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


_exit_freeze_registered = False


def skip_exit_collection() -> None:
    """At interpreter exit, skip the garbage collector's passes over everything still alive.

    Python's shutdown runs several full collections while it tears modules down; after a run that
    has imported torch, transformers, TRL and Prefect that is ~500k objects per pass, ~1 s on a small
    CPU, spent after the command's work and output are done. Freezing them at exit (the last exit
    handler, so after Prefect has flushed its logs and the temporary server has stopped) leaves those
    passes nothing to scan; the memory goes back to the OS with the process. An atexit handler, so a
    caller that runs several commands in one process (tests) is unaffected until it exits."""
    global _exit_freeze_registered
    if not _exit_freeze_registered:
        atexit.register(gc.freeze)  # registered first, so it runs after every later-registered handler
        _exit_freeze_registered = True


def freeze_imports() -> None:
    """Move what the imports so far created (modules, classes, functions: ~260k objects once Prefect
    and torch are in) out of the collector's reach, once per process.

    They live as long as the process, yet every full collection during the run scans them again:
    ~2 s of a demo run on 2 cores. Frozen (the pattern `gc.freeze` is documented for), later full
    collections scan only what the run itself allocates. Once per process: a caller that runs
    several commands in one process never freezes its later garbage."""
    if gc.get_freeze_count() == 0:
        gc.freeze()


def quiet_data_tracebacks() -> None:
    """On the terminal an explained error (dpoflow.base.errors: bad data, a missing tool, a failed check)
    is its one clear line, which the CLI prints, not a traceback; Prefect's own log of the run (its
    API handler) still records the traceback. Wraps the formatter of Prefect's console handler, once."""
    import logging

    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _NoDataTraceback):
            handler.setFormatter(_NoDataTraceback(handler.formatter or logging.Formatter()))


class _NoDataTraceback:
    """A console formatter that leaves out the traceback of an explained error (the message stays)."""

    def __init__(self, inner):
        self.inner = inner

    def format(self, record) -> str:
        from dpoflow.base.errors import Explained

        if not (record.exc_info and isinstance(record.exc_info[1], Explained)):
            return self.inner.format(record)
        saved = record.exc_info, record.exc_text  # the record is shared with the other handlers
        record.exc_info = record.exc_text = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text = saved

    def __getattr__(self, name):
        return getattr(self.inner, name)
