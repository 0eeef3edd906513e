"""The flow Prefect deployments run (`dpoflow sync` / `dpoflow serve` create them from pipelines.yaml):
it reads the named pipeline from the file in the deployment's code, applies the run's overrides (a
typed form in the Prefect UI) the way `--set` does, and runs the pipeline in this same flow run, so
its stages, logs and artifacts are on the run a user opens from the deployment.

Where the run keeps its work: a workdir inside a worker's throwaway clone (`deploy.repository`) would
be deleted with it, and nothing would ever be cached, so such runs use `DPOFLOW_WORKDIR`, else
`$DPOFLOW_CACHE_DIR/workdir` (default `~/.cache/dpoflow/workdir`; `/data/dpoflow/workdir` in the
image), unless the pipeline or the run names an absolute `workdir`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from dpoflow.base.config import ConfigError, PipelineConfig, load_pipeline
from dpoflow.base.overrides import PipelineOverrides, as_set_items
from dpoflow.base.runtime import cache_root, configure_environment

from dpoflow.flows.pipeline import pipeline


def persistent_workdir(config: PipelineConfig, file: Path) -> PipelineConfig:
    """`config` with a workdir that outlives the run's code checkout (see the module docstring)."""
    inside_checkout = Path(config.workdir).is_relative_to(file.resolve().parent)
    if not (config.deploy.repository and inside_checkout):
        return config
    base = os.environ.get("DPOFLOW_WORKDIR") or cache_root() / "workdir"
    return config.model_copy(update={"workdir": str(Path(base).expanduser().resolve())})


@flow(name="dpoflow-deployment")
def deployed_pipeline(pipeline_name: str, overrides: PipelineOverrides | None = None,  # type: ignore[valid-type]
                      file: str = "pipelines.yaml") -> dict[str, Any]:
    """Run pipeline `pipeline_name` of `file` (relative to the deployment's working directory), with
    `overrides` changing fields of its config for this run only (empty fields keep the file's values)."""
    configure_environment()
    logger = get_run_logger()
    items = as_set_items(overrides)
    try:
        config = load_pipeline(pipeline_name, file, items)
    except ConfigError as e:  # one line per bad field in the run's log, not a traceback
        raise ValueError("invalid config: " + "; ".join(e.problems)) from None
    config = persistent_workdir(config, Path(file))
    logger.info("pipeline %s from %s; overrides: %s; workdir: %s", pipeline_name, Path(file).resolve(),
                ", ".join(items) or "none", config.workdir)
    return pipeline.fn(config, items)
