"""Cache keys and where cached stage outputs live.

A stage's key is the digest of: its name, its code (the stage module plus the shared `dpoflow`
modules it builds on), the versions of the libraries that shape its numbers, and its inputs as
content digests and config values. Prefect stores the stage's result under that key
(`cache_key_from_param`); the outputs themselves live in `<workdir>/stages/<stage>/<key>/`.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from functools import cache
from pathlib import Path
from typing import Any

from .artifacts import file_sha256, json_digest

# Libraries whose upgrade can change a stage's outputs.
VERSIONED = ("torch", "transformers", "trl", "peft", "datasets", "tokenizers", "accelerate")
# Shared modules that do not shape outputs: editing them must not invalidate caches.
NOT_CODE = {"cli.py", "summary.py", "runtime.py"}


@cache
def library_versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


@cache
def code_digest(module_name: str) -> str:
    shared = Path(__file__).parent
    files = {"stage": file_sha256(Path(sys.modules[module_name].__file__))}
    for p in sorted(shared.rglob("*")):
        if p.is_file() and p.suffix in {".py", ".txt"} and p.name not in NOT_CODE and "__pycache__" not in p.parts:
            files[p.relative_to(shared).as_posix()] = file_sha256(p)
    return json_digest(files)


def key_material(stage: str, module_name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """Everything a stage's key is made of; kept on disk so `explain` can say what changed."""
    return {"stage": stage, "code": code_digest(module_name), "libraries": library_versions(), "inputs": inputs}


def stage_key(stage: str, module_name: str, inputs: dict[str, Any]) -> str:
    return json_digest(key_material(stage, module_name, inputs))


def cache_key_from_param(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect cache_key_fn: every stage task takes its precomputed content key as `key`."""
    return f"{parameters['stage']}-{parameters['key']}"


class Workspace:
    """The folder layout under `workdir`; the only place that knows it."""

    def __init__(self, workdir: str | Path):
        self.root = Path(workdir)

    @property
    def results(self) -> Path:
        return self.root / "results"

    def stage_dir(self, stage: str, key: str) -> Path:
        return self.root / "stages" / stage / key[:24]

    def checkpoints(self, stage: str, key: str) -> Path:
        """Resumable training state of a stage still in progress (removed when it succeeds)."""
        return self.root / "checkpoints" / stage / key[:24]

    def key_file(self, stage: str, key: str) -> Path:
        return self.root / "keys" / stage / f"{key[:24]}.json"

    def save_key_material(self, stage: str, key: str, material: dict) -> None:
        path = self.key_file(stage, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(material, indent=1, sort_keys=True, default=str))

    def result_file(self, stage: str, key: str) -> Path:
        """Where Prefect persists the stage's result (the name is cache_key_from_param's)."""
        return self.results / f"{stage}-{key}"

    def runs(self, pipeline: str) -> Path:
        return self.root / "runs" / pipeline
