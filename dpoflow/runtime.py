"""Process settings applied before heavy imports: quiet, offline-friendly Prefect defaults and CPU threads."""

from __future__ import annotations

import os

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The temporary local server takes 8-15 s to start the first time, longer on a loaded machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_UI_ENABLED": "false",
}


def configure_environment() -> None:
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def set_cpu_threads(threads: int | None) -> None:
    """Tiny models on few cores run many times faster single-threaded (no OpenMP contention)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
