"""The sweep flow: several variants of one pipeline (dpoflow.base.sweeps) in one flow run.

The variants' training halves run first, back to back: they share the model, prepare, sft and reference
stages through the cache, and their DPO stages share one loaded model (a dpoflow.engine.model_reuse.ModelKeeper
this flow holds), so a variant costs its training steps and not a model load. Then each variant is evaluated, exported and
recorded as its own pipeline run would be, and a table compares them. A variant that fails does not
stop the others; the sweep fails at the end if any did.
"""

from __future__ import annotations

import json
import traceback
from contextlib import ExitStack, contextmanager
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from dpoflow.base.cache import Workspace
from dpoflow.base.config import PipelineConfig
from dpoflow.engine.model_reuse import ModelKeeper
from dpoflow.base.redact import redact, redact_flow_parameters
from dpoflow.base.runtime import set_cpu_threads
from dpoflow.base.sweeps import Variant, comparison_markdown, comparison_row
from dpoflow.engine.tracking import TrackedRun, open_run

from .pipeline import (GateBlocked, StageRunner, artifact_key, compose_release, compose_training,
                       ending_tracked_run, hardware_plans, new_run_folder, record_run, run_folder_name, start_backend)


class SweepFailed(RuntimeError):
    """Some variants failed; `sweep_dir` holds the table of all of them."""

    def __init__(self, message: str, sweep_dir):
        super().__init__(message)
        self.sweep_dir = sweep_dir


@redact_flow_parameters
@flow(name="dpoflow-sweep")
def sweep(variants: list[Variant], overrides: list[str] | None = None) -> dict[str, Any]:
    """Train, evaluate and export every variant; returns the comparison. `overrides` are the --set items
    common to all variants, for the record."""
    logger = get_run_logger()
    first = variants[0].config
    if len({(v.config.name, v.config.workdir) for v in variants}) != 1:
        raise ValueError("a sweep's variants are one pipeline in one workdir")
    set_cpu_threads(first.cpu_threads)
    workspace = Workspace(first.workdir)
    sweep_id = run_folder_name()
    sweep_dir = workspace.runs(first.name) / "sweeps" / sweep_id
    runs = [StageRunner(workspace) for _ in variants]
    # Each variant is a tracked run of its own, tagged with the sweep and the variant; all opened before
    # any training, so an unreachable tracker stops the sweep at once.
    tracked = [open_run(v.config, f"{sweep_id}-v{i + 1}", {"dpoflow.sweep": sweep_id, "dpoflow.variant": v.label})
               for i, v in enumerate(variants)]
    with ending_tracked_runs(tracked):
        backends = [start_backend(v.config) for v in variants]
        trained, errors = {}, {}
        with ModelKeeper() as kept:
            for i, (variant, run, backend) in enumerate(zip(variants, runs, backends)):
                logger.info("sweep variant %d of %d: %s: training", i + 1, len(variants), variant.label)
                try:
                    trained[i] = compose_training(variant.config, run, hardware_plans(variant.config, backend.name), kept,
                                                  tracked[i].ref if tracked[i] else None)
                except Exception as e:  # noqa: BLE001 - recorded in the table; the other variants go on
                    errors[i] = _failure(logger, variant, e, tracked[i])
        rows = []
        for i, variant in enumerate(variants):
            if i in trained:
                logger.info("sweep variant %d of %d: %s: evaluation and export", i + 1, len(variants), variant.label)
                try:
                    rows.append(_release(variant, runs[i], backends[i], trained[i], workspace, sweep_dir / f"v{i + 1}",
                                         [*(overrides or []), *variant.items], f"{first.name}-sweep-v{i + 1}",
                                         tracked[i]))
                    continue
                except Exception as e:  # noqa: BLE001
                    errors[i] = _failure(logger, variant, e, tracked[i])
            rows.append({"variant": variant.label, "method": variant.config.dpo.method, "error": errors[i],
                         "run_dir": None})
    sweep_dir.mkdir(parents=True, exist_ok=True)
    rows, overrides = redact(rows), redact(overrides or [])  # the variants' items are in the records
    # How many training-model loads the variants' DPO stages (and reference pass) paid, and how many reused one.
    loads = {"loads": kept.loads, "reuses": kept.reuses}
    table = comparison_markdown(first.name, rows, [
        f"training model: {kept.loads} load(s) for the {kept.loads + kept.reuses} DPO stage(s) that ran (reference "
        "passes included); the others reused the loaded one" if kept.loads else
        "training model: not loaded; every DPO stage came from the cache"])
    (sweep_dir / "sweep.json").write_text(json.dumps({"pipeline": first.name, "overrides": overrides,
                                                      "training_model": loads, "variants": rows}, indent=1))
    (sweep_dir / "sweep.md").write_text(table)
    create_markdown_artifact(table, key=artifact_key(first.name) + "-sweep", description=f"sweep of {first.name}")
    create_table_artifact([{k: v for k, v in r.items() if k != "exports"} for r in rows],
                          key=artifact_key(first.name) + "-sweep-table")
    logger.info("sweep folder: %s", sweep_dir)
    if errors:
        raise SweepFailed(f"{len(errors)} of {len(variants)} variants failed: "
                          + "; ".join(f"{variants[i].label}: {msg}" for i, msg in errors.items())
                          + f" (table: {sweep_dir / 'sweep.md'})", sweep_dir)
    return {"pipeline": first.name, "sweep_dir": str(sweep_dir), "training_model": loads, "variants": rows}


@contextmanager
def ending_tracked_runs(tracked: list[TrackedRun | None]):
    """Every variant's tracked run that did not finish is ended (KILLED on Ctrl-C, FAILED on an error)."""
    with ExitStack() as stack:
        for run in tracked:
            stack.enter_context(ending_tracked_run(run))
        yield


def _release(variant: Variant, run: StageRunner, backend, trained, workspace: Workspace, run_dir, overrides,
             artifact_name, tracked: TrackedRun | None) -> dict:
    config = variant.config
    blocked = None
    try:
        out = compose_release(config, run, trained)
    except GateBlocked as e:  # a variant the gate stops is a result of the sweep, not a failure
        blocked, out = e, e.outputs
    new_run_folder(workspace, config, run_dir)
    summary = record_run(config, backend, run, out, blocked, run_dir, overrides, artifact_name, latest=False,
                         tracked=tracked)
    return comparison_row(variant, summary)


def _failure(logger, variant: Variant, error: Exception, tracked: TrackedRun | None) -> str:
    logger.error("sweep variant %s failed:\n%s", variant.label, "".join(traceback.format_exception(error)))
    if tracked is not None and not tracked.ended:
        tracked.end("FAILED", f"{type(error).__name__}: {error}")
    return f"{type(error).__name__}: {error}"
