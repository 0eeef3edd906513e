"""model: make the base model loadable from a local folder and give it a content digest."""

from __future__ import annotations

from pathlib import Path

from dpoflow.base.artifacts import fresh_dir
from dpoflow.base.config import ModelSpec
from dpoflow.engine.models import key_inputs, materialize
from dpoflow.base.records import ModelRef

from . import retry_if_transient, stage_task


def resolve_base_model(spec: ModelSpec, out_dir: Path) -> ModelRef:
    path, digest = materialize(spec, fresh_dir(out_dir))
    return ModelRef(path=path, digest=digest, source=spec.source, role="base")


def model_content(inputs: dict) -> dict:
    """What the model stage is keyed by beyond its spec: the content the spec names."""
    return {"model": key_inputs(inputs["spec"])}


# A Hub download can fail half-way on a flaky network: Prefect retries it (the Hub client resumes).
@stage_task(depends_on=model_content, retries=3, retry_delay_seconds=[10, 30, 90],
            retry_condition_fn=retry_if_transient)
def model_task(out_dir: str, spec: ModelSpec) -> ModelRef:
    return resolve_base_model(spec, Path(out_dir))
