"""One module per pipeline stage. Each holds the stage's plain functions (no Prefect needed to call
them) and, at the bottom, its thin Prefect task. A stage never imports another stage."""

from __future__ import annotations

import functools

from dpoflow.cache import cache_key_from_param
from dpoflow.runtime import StageInterrupted

try:
    from prefect import task
except ImportError:  # stage logic alone (e.g. a bare GPU box running bench/): no tasks, same functions
    task = None


def stage_task(fn=None, **options):
    """A stage's Prefect task: its result is cached under the content key the flow passes as `key`
    and persisted as JSON, so a later run (any process) reuses it. `options` are more of Prefect's
    task options (retries for a stage that talks to the network). Ctrl-C inside it is reported with
    the stage's name (dpoflow.runtime.StageInterrupted)."""
    if fn is None:
        return lambda f: stage_task(f, **options)

    @functools.wraps(fn)
    def interruptible(stage: str, *args, **kwargs):
        try:
            return fn(stage, *args, **kwargs)
        except StageInterrupted:  # the stage said more (the dpo step and checkpoint)
            raise
        except KeyboardInterrupt:  # Ctrl-C: say in which stage it landed
            raise StageInterrupted(stage) from None

    if task is None:
        return interruptible
    return task(
        name=fn.__name__.removesuffix("_task"),
        cache_key_fn=cache_key_from_param,
        persist_result=True,
        result_serializer="json",
        **options,
    )(interruptible)


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's retry condition for network stages: retry a dropped connection, a timeout or a Hub 5xx,
    never an error that another try cannot fix (a missing repo, a bad token, a bad config)."""
    from dpoflow.hub import transient

    error = state.result(raise_on_failure=False)
    return isinstance(error, Exception) and transient(error)[0]


def stage_logger():
    """Where a stage's launched ranks print to: the Prefect task's logger inside a run, else stdout."""
    try:
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger
    except ImportError:  # the stage functions also run without Prefect (a GPU box, a launched rank)
        return print
    try:
        return get_run_logger().info
    except MissingContextError:
        return print
