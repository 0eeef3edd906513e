"""model: make the base model loadable from a local folder and give it a content digest."""

from __future__ import annotations

from pathlib import Path

from dpoflow.artifacts import fresh_dir
from dpoflow.config import ModelSpec
from dpoflow.models import materialize
from dpoflow.records import ModelRef

from . import retry_if_transient, stage_task


def resolve_base_model(spec: ModelSpec, out_dir: Path) -> ModelRef:
    path, digest = materialize(spec, fresh_dir(out_dir))
    return ModelRef(path=path, digest=digest, source=spec.source, role="base")


# A Hub download can fail half-way on a flaky network: Prefect retries it (the Hub client resumes).
@stage_task(retries=3, retry_delay_seconds=[10, 30, 90], retry_condition_fn=retry_if_transient)
def model_task(stage: str, key: str, out_dir: str, spec: ModelSpec) -> ModelRef:
    return resolve_base_model(spec, Path(out_dir))
