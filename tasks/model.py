"""model: make the base model loadable from a local folder and give it a content digest."""

from __future__ import annotations

from pathlib import Path

from dpoflow.artifacts import fresh_dir
from dpoflow.config import ModelSpec
from dpoflow.models import materialize
from dpoflow.records import ModelRef

from . import stage_task


def resolve_base_model(spec: ModelSpec, out_dir: Path) -> ModelRef:
    path, digest = materialize(spec, fresh_dir(out_dir))
    return ModelRef(path=path, digest=digest, source=spec.source, role="base")


@stage_task
def model_task(stage: str, key: str, out_dir: str, spec: ModelSpec) -> ModelRef:
    return resolve_base_model(spec, Path(out_dir))
