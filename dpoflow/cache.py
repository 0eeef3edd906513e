"""Cache keys and where cached stage outputs live.

A stage's key is the digest of: its name, its code (the stage module plus the shared `dpoflow`
modules it builds on), the versions of the libraries that shape its numbers, and its inputs as
content digests and config values. Prefect stores the stage's result under that key
(`cache_key_from_param`); the outputs themselves live in `<workdir>/stages/<stage>/<key>/`.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import importlib.metadata
import json
import sys
from functools import cache
from pathlib import Path
from typing import Any

from .artifacts import file_sha256, json_digest, write_atomically
from .redact import redact

# Libraries whose upgrade can change a stage's outputs.
VERSIONED = ("torch", "transformers", "trl", "peft", "datasets", "tokenizers", "accelerate")
PACKAGE = Path(__file__).resolve().parent


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
    """Digest of a stage module's source and of every dpoflow module it imports, directly or not
    (function-level imports included), plus the data files built-in models are made from. Editing a
    module the stage never imports (the CLI, say) leaves its cache valid."""
    files = {"stage": file_sha256(Path(sys.modules[module_name].__file__))}
    for path in sorted(_dpoflow_imports(Path(sys.modules[module_name].__file__))):
        files[path.relative_to(PACKAGE).as_posix()] = file_sha256(path)
    for path in sorted((PACKAGE / "builtin").glob("*")):
        files[path.relative_to(PACKAGE).as_posix()] = file_sha256(path)
    return json_digest(files)


def _dpoflow_imports(source: Path, seen: set[Path] | None = None) -> set[Path]:
    """dpoflow's own module files that `source` imports, transitively (read from the code, not run)."""
    seen = set() if seen is None else seen
    for path in _direct_imports(source, *_stamp(source)):
        if path not in seen:
            seen.add(path)
            _dpoflow_imports(path, seen)
    return seen


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


@cache
def _direct_imports(source: Path, mtime_ns: int, size: int) -> tuple[Path, ...]:
    """The dpoflow module files `source` imports itself. Parsed once per version of the file (the
    stages share most of their modules: every stage key needs them)."""
    found: list[Path] = []
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: only dpoflow's own modules count (".x" inside dpoflow/)
                base = "dpoflow." + base if source.parent == PACKAGE else ""
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            if not name.startswith("dpoflow."):
                continue
            path = PACKAGE.joinpath(*name.split(".")[1:]).with_suffix(".py")
            if path.is_file() and path not in found:
                found.append(path)
    return tuple(found)


def key_material(stage: str, module_name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """Everything a stage's key is made of; kept on disk so `explain` can say what changed."""
    return {"stage": stage, "code": code_digest(module_name), "libraries": library_versions(), "inputs": inputs}


def stage_key(stage: str, module_name: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(key, the material it is the digest of)."""
    material = key_material(stage, module_name, inputs)
    return json_digest(material), material


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
        """Redacted: the key is the digest of the real material, the file only has to say what changed."""
        material = redact(json.loads(json.dumps(material, default=str)))
        write_atomically(self.key_file(stage, key), json.dumps(material, indent=1, sort_keys=True))

    @contextlib.contextmanager
    def stage_lock(self, stage: str, key: str):
        """Held while a stage with this key runs or is looked up: a second run needing the same
        stage output (another pipeline, or the same one started twice) waits, then finds it cached,
        instead of building it over the first one's half-written folder."""
        path = self.root / "locks" / f"{stage}-{key[:24]}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def result_file(self, stage: str, key: str) -> Path:
        """Where Prefect persists the stage's result (the name is cache_key_from_param's)."""
        return self.results / f"{stage}-{key}"

    def runs(self, pipeline: str) -> Path:
        return self.root / "runs" / pipeline
