"""One module per pipeline stage. Each holds the stage's plain functions (no Prefect needed to call
them) and, at the bottom, its thin Prefect task. A stage never imports another stage."""

from __future__ import annotations

import functools

from dpoflow.base.cache import StageInputs
from dpoflow.base.runtime import StageInterrupted

try:
    from prefect import task
except ImportError:  # stage logic alone (e.g. a bare GPU box running bench/): no tasks, same functions
    task = None

# Parameters of every stage task that are not part of its cache key.
RUN_ONLY = {
    "out_dir": "where this key's outputs go: chosen from the key",
    "checkpoint_dir": "where a run in progress keeps its checkpoints: chosen from the key",
    "keeper": "the flow's keeper of a loaded training model: saves a load, changes nothing trained",
    "tracker": "the tracked run a training stage sends its curve to: where it is watched, not what is trained",
}


def stage_task(fn=None, *, stage: str | None = None, not_key: dict[str, str] | None = None, depends_on=None,
               **options):
    """A stage's Prefect task (named `stage`, default the function's name less `_task`): its result is
    cached under a key derived from its arguments (dpoflow.base.cache.StageInputs) and persisted as JSON, so
    a later run (any process) reuses it. `not_key`: more parameters (beyond RUN_ONLY) that do not change
    what the stage makes, with why; `depends_on(arguments)`: what it depends on that is not an argument.
    `options` are more of Prefect's task options (retries for a stage that talks to the network). Ctrl-C
    inside it is reported with the stage's name (dpoflow.base.runtime.StageInterrupted)."""
    if fn is None:
        return lambda f: stage_task(f, stage=stage, not_key=not_key, depends_on=depends_on, **options)
    name = stage or fn.__name__.removesuffix("_task")

    @functools.wraps(fn)
    def interruptible(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StageInterrupted:  # the stage said more (the dpo step and checkpoint)
            raise
        except KeyboardInterrupt:  # Ctrl-C: say in which stage it landed
            raise StageInterrupted(name) from None

    if task is None:
        return interruptible
    policy = StageInputs(stage=name, module=fn.__module__, not_key={**RUN_ONLY, **(not_key or {})},
                         depends_on=depends_on)
    return task(name=name, cache_policy=policy, persist_result=True, result_serializer="json",
                **options)(interruptible)


def stage_policy(stage_task) -> StageInputs:
    """The cache policy a stage task was declared with."""
    return stage_task.cache_policy


def training_backend(inputs: dict) -> dict:
    """What a training stage depends on beyond its arguments: the backend its `setup` resolves to on this
    machine (Unsloth or TRL + PEFT train the same spec differently)."""
    from dpoflow.engine.backends import choose_backend

    return {"backend": choose_backend(inputs["setup"]).name}


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's retry condition for network stages: retry a dropped connection, a timeout or a Hub 5xx,
    never an error that another try cannot fix (a missing repo, a bad token, a bad config)."""
    from dpoflow.engine.hub import transient

    error = state.result(raise_on_failure=False)
    return isinstance(error, Exception) and transient(error)[0]


def curve_callbacks(tracker, stage: str) -> list:
    """The Trainer callbacks that send a training stage's curve to its tracked run (none untracked)."""
    if tracker is None:
        return []
    from dpoflow.engine.tracking import curve_callback

    return [curve_callback(tracker, stage)]


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
