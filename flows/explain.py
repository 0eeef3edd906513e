"""`dpoflow explain`: what running a pipeline would do, before anything runs.

It walks the same wiring as the flow (`compose`), but instead of running a stage it computes the
stage's key (as the flow does, from the arguments) and looks in the cache: a stage whose result and
outputs are there comes from cache; any other runs, and the reason is the difference between its key
material and the one the pipeline's last run used. What a stage that runs will make is not known
yet: the stages after it run too, and the forecast follows the path on which it goes well (a
forgetting check that is not scored yet passes).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpoflow.base.artifacts import is_intact
from dpoflow.engine.backends import BackendError, choose_backend
from dpoflow.base.cache import Workspace
from dpoflow.base.config import PipelineConfig
from dpoflow.base.hardware import TrainingPlan, describe, plan_stage
from dpoflow.engine.models import BUILTIN, source_kind
from dpoflow.base.redact import redact
from dpoflow.tasks import stage_policy

from .pipeline import GateBlocked, compose, stage_key


@dataclass
class Pending:
    """What a stage that will run makes, or what is derived from it: not known yet. It stands in for
    the record in the wiring: no digest or path yet, and a check on it (`passed`) is assumed to pass."""

    stage: str
    digest: None = None
    path: None = None
    passed: bool = True


@dataclass
class Forecast:
    stage: str
    verdict: str  # "cached" | "runs" | "stops" (the forgetting check, on cached scores, stops the run)
    why: str


class CachePeek:
    """Stands in for the flow's StageRunner: looks stages up by key instead of running them."""

    def __init__(self, workspace: Workspace, previous_keys: dict[str, str]):
        self.workspace = workspace
        self.previous_keys = previous_keys
        self.forecasts: list[Forecast] = []

    def __call__(self, task, **arguments) -> Any:
        waiting = _waiting_on(arguments.values())
        if waiting:
            stage = stage_policy(task).stage
            self.forecasts.append(Forecast(stage, "runs", f"after {', '.join(waiting)}, whose output will be new"))
            return Pending(stage)
        policy, key, material = stage_key(task, arguments)
        stage = policy.stage
        result = self.workspace.result_file(stage, key)
        if result.is_file() and is_intact(self.workspace.stage_dir(stage, key)):
            from prefect.results import ResultRecord

            self.forecasts.append(Forecast(stage, "cached", f"same inputs, code and libraries (key {key[:12]})"))
            return ResultRecord.deserialize(result.read_bytes()).result
        self.forecasts.append(Forecast(stage, "runs", self._why(stage, key, material, result.is_file())))
        return Pending(stage)

    def derive(self, fn, *args) -> Any:
        """A step on stage outputs: computed when they are known (cached), else pending with them."""
        waiting = _waiting_on(args)
        return Pending(waiting[0]) if waiting else fn(*args)

    def _why(self, stage: str, key: str, material: dict, had_result: bool) -> str:
        if had_result:
            return "its cached outputs are missing or were altered on disk"
        previous = self.previous_keys.get(stage)
        path = self.workspace.key_file(stage, previous) if previous else None
        if path is None or not path.is_file():
            return "no earlier run of this pipeline to reuse"
        # The key file is redacted (Workspace.save_key_material): compare like with like.
        current = redact(json.loads(json.dumps(material, default=str)))
        return "; ".join(differences(json.loads(path.read_text()), current)) or "key changed (a redacted value)"


def _waiting_on(values) -> list[str]:
    """The stages whose pending outputs are among `values` (or inside a list of them), in order."""
    flat = [x for v in values for x in (v if isinstance(v, list) else [v])]
    return list(dict.fromkeys(v.stage for v in flat if isinstance(v, Pending)))


def differences(old: dict, new: dict, limit: int = 6) -> list[str]:
    """Human-readable differences between two key materials, e.g. `dpo.spec.beta: 0.1 -> 0.2`."""
    a, b = _flatten(old), _flatten(new)
    out = []
    for path in sorted(set(a) | set(b)):
        if a.get(path) == b.get(path):
            continue
        if path == "code":
            out.append("the code of this stage or of dpoflow changed")
        elif _is_digest(a.get(path)) or _is_digest(b.get(path)):
            out.append(f"{path.removeprefix('inputs.')}: upstream content changed")
        else:
            out.append(f"{path.removeprefix('inputs.')}: {a.get(path, '(none)')} -> {b.get(path, '(none)')}")
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: json.dumps(d) if isinstance(d, list) else d}


def _is_digest(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def previous_keys(workspace: Workspace, pipeline: str) -> dict[str, str]:
    summary = workspace.runs(pipeline) / "latest" / "summary.json"
    if not summary.is_file():
        return {}
    return {row["stage"]: row.get("key", "") for row in json.loads(summary.read_text())["stages"]}


def explain(config: PipelineConfig) -> dict[str, Any]:
    """Forecast of every stage, the backend and the hardware plans, without running anything."""
    workspace = Workspace(config.workdir)
    try:
        backend = choose_backend(config.train)
    except BackendError as e:
        return {"error": str(e)}
    peek = CachePeek(workspace, previous_keys(workspace, config.name))
    with tempfile.TemporaryDirectory() as tmp:
        planning_model: dict[str, Path | None] = {}

        def plan_for(spec, model) -> TrainingPlan | None:
            folder = model.path if not isinstance(model, Pending) else _model_for_planning(config, Path(tmp),
                                                                                          planning_model)
            return plan_stage(config.train, spec, folder, backend=backend.name) if folder else None

        try:
            out = compose(config, peek, plan_for)
        except GateBlocked as blocked:  # the scores are cached and fail the check: nothing after it would run
            out = blocked.outputs
            peek.forecasts.append(Forecast("export", "stops", str(blocked)))
    return {"backend": backend, "forecasts": peek.forecasts, "plans": out.plans}


def _model_for_planning(config: PipelineConfig, tmp: Path, memo: dict) -> Path | None:
    """The base model's folder before the model stage ran: a local folder as is, a built-in one built
    into a temporary folder (a second or two); a Hub model is not downloaded for a forecast."""
    if "folder" not in memo:
        kind = source_kind(config.model)
        if kind == "local":
            memo["folder"] = Path(config.model.source)
        elif kind == "builtin":
            from dpoflow.engine.tiny import build_tiny_model

            memo["folder"] = build_tiny_model(config.model.source[len(BUILTIN):], tmp / "model")
        else:
            memo["folder"] = None
    return memo["folder"]


def render(config: PipelineConfig, result: dict[str, Any]) -> str:
    import yaml

    lines = ["# resolved config (defaults + pipeline + overrides)",
             yaml.safe_dump(redact(config.model_dump(mode="json")), sort_keys=False).rstrip(), ""]
    if "error" in result:
        return "\n".join(lines + [f"backend: not usable: {result['error']}"])
    backend = result["backend"]
    lines += [f"backend: {backend.name} ({backend.reason})", "", "stages:"]
    width = max(len(f.stage) for f in result["forecasts"])
    lines += [f"  {f.stage:<{width}}  {f.verdict:<6}  {f.why}" for f in result["forecasts"]]
    for stage, plan in result["plans"].items():
        lines += ["", f"hardware plan for {stage}:", *("  " + line for line in describe(plan).splitlines())]
    if not result["plans"]:
        lines += ["", "hardware plan: available once the model is downloaded (Hub models are not fetched here)"]
    return "\n".join(lines)
