"""The flow Prefect deployments run (`dpoflow sync` / `dpoflow serve` create them from pipelines.yaml):
it reads the named pipeline from the file in the deployment's code, applies the run's overrides (a
typed form in the Prefect UI) the way `--set` does, and runs the pipeline flow as a subflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from dpoflow.config import load_pipeline
from dpoflow.overrides import PipelineOverrides, as_set_items
from dpoflow.runtime import configure_environment

from dpoflow.flows.pipeline import pipeline


@flow(name="dpoflow-deployment")
def deployed_pipeline(pipeline_name: str, overrides: PipelineOverrides | None = None,  # type: ignore[valid-type]
                      file: str = "pipelines.yaml") -> dict[str, Any]:
    """Run pipeline `pipeline_name` of `file` (relative to the deployment's working directory), with
    `overrides` changing fields of its config for this run only."""
    configure_environment()
    items = as_set_items(overrides)
    get_run_logger().info("pipeline %s from %s; overrides: %s", pipeline_name, Path(file).resolve(),
                          ", ".join(items) or "none")
    return pipeline(load_pipeline(pipeline_name, file, items), items)
