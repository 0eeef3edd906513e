"""Cache keys and where cached stage outputs live.

A stage's key is derived from the arguments it is called with (`StageInputs`, the Prefect cache
policy of every stage task): records by their content digest, config sections by their fields but
those the schema marks `not_key`, plain values as they are; plus its name, its code (the stage module
and the shared `dpoflow` modules it builds on), the versions of the libraries that shape its numbers,
and what the task declares it depends on beyond its arguments (the backend, the evaluation items...).
Prefect stores the stage's result under that key; the outputs themselves live in
`<workdir>/stages/<stage>/<key>/`.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import fcntl
import importlib.metadata
import json
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dpoflow.base.artifacts import file_sha256, json_digest, write_atomically
from dpoflow.base.records import Record
from dpoflow.base.redact import redact

try:
    from prefect.cache_policies import CachePolicy
except ImportError:  # stage logic alone (a bare GPU box running bench/): keys without Prefect
    @dataclasses.dataclass
    class CachePolicy:  # type: ignore[no-redef]
        pass

# Libraries whose upgrade can change a stage's outputs.
VERSIONED = ("torch", "transformers", "trl", "peft", "datasets", "tokenizers", "accelerate")
PACKAGE = Path(__file__).resolve().parents[1]  # dpoflow/


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
    package = _package_of(source)
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative to the importing module's package, when that is dpoflow's own
                parent = package[:len(package) - node.level + 1] if package else []
                base = ".".join([*parent, base] if base else parent)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            path = _module_file(name)
            if path is not None and path not in found:
                found.append(path)
    return tuple(found)


def _package_of(source: Path) -> list[str]:
    """The dotted package of a dpoflow module file (["dpoflow", "tasks"] for tasks/dpo.py, reached
    through the dpoflow/tasks link or not); empty for a file outside dpoflow."""
    for folder in [PACKAGE, *(p for p in PACKAGE.iterdir() if p.is_symlink())]:
        try:
            relative = source.resolve().relative_to(folder.resolve())
        except ValueError:
            continue
        inside = [] if folder == PACKAGE else [folder.name]
        return ["dpoflow", *inside, *relative.parent.parts]
    return []


def _module_file(name: str) -> Path | None:
    """The file of dpoflow module or package `name` under PACKAGE, if it is one."""
    parts = name.split(".")
    if parts[0] != "dpoflow" or len(parts) < 2:
        return None
    path = PACKAGE.joinpath(*parts[1:])
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def key_value(value: Any) -> Any:
    """A stage argument as its cache key holds it: a record by its digest (and the digests of the records
    it embeds, such as an adapter's start model); a config section or a plan by its fields, less those
    its class lists in `not_key`; lists and mappings item by item; a plain value as it is."""
    if isinstance(value, Record):
        embedded = {name: key_value(v) for name, v in value if isinstance(v, Record)}
        return {"digest": value.digest, **embedded} if embedded else value.digest
    if isinstance(value, BaseModel):
        left_out = getattr(type(value), "not_key", {})
        return {name: key_value(getattr(value, name)) for name in type(value).model_fields if name not in left_out}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        left_out = getattr(type(value), "not_key", {})
        return {f.name: key_value(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name not in left_out}
    if isinstance(value, (list, tuple)):
        return [key_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): key_value(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"a {type(value).__name__} cannot be part of a cache key: make it a record with a digest, "
                    "or list the parameter in its task's not_key")


@dataclasses.dataclass
class StageInputs(CachePolicy):
    """Prefect cache policy of a stage task: the key is the digest of `material(inputs)`.

    `not_key`: parameters that do not change what the stage makes (where it writes, the run's name, the
    flow's loaded-model keeper), with why. `depends_on(inputs)`: what the stage's output depends on
    beyond its arguments (the backend its setup resolves to on this machine, the content a model id
    names); `resolved` computes it once for a call, for the flow and Prefect to share."""

    stage: str = ""
    module: str = ""
    not_key: dict[str, str] = dataclasses.field(default_factory=dict)
    depends_on: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    extra: dict[str, Any] | None = None  # depends_on's answer for one call (`resolved`)

    def resolved(self, inputs: dict[str, Any]) -> "StageInputs":
        extra = self.depends_on(inputs) if self.depends_on else {}
        return dataclasses.replace(self, extra=extra)

    def material(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Everything the key is the digest of; kept on disk so `explain` can say what changed."""
        extra = self.extra if self.extra is not None else self.resolved(inputs).extra
        return {"stage": self.stage, "code": code_digest(self.module), "libraries": library_versions(),
                "inputs": {name: key_value(v) for name, v in inputs.items() if name not in self.not_key},
                "extra": extra}

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str:
        return prefect_key(self.stage, json_digest(self.material(inputs)))


def prefect_key(stage: str, key: str) -> str:
    """The name Prefect stores a stage's result under (in `Workspace.results`)."""
    return f"{stage}-{key}"


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
        """Where Prefect persists the stage's result."""
        return self.results / prefect_key(stage, key)

    def runs(self, pipeline: str) -> Path:
        return self.root / "runs" / pipeline
