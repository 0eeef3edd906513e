"""Pipelines as Prefect deployments, in one of two ways that never touch each other's deployments.

- Work pools (`dpoflow sync`): every pipeline with `deploy.enabled` and a `deploy.work_pool` becomes a
  deployment of the `dpoflow-deployment` flow named after the pipeline, tagged `dpoflow-managed`; the
  pool's workers run it. `sync` reads what the server has under that tag, works out the difference
  (create, update, delete), prints it, and with `--dry-run` stops there. An unchanged deployment is not
  touched, so its id and its scheduled runs stay; one whose pipeline left the file (or lost its work
  pool) is deleted with its scheduled runs.
- One machine (`dpoflow serve`): the deploy-enabled pipelines without a work pool are registered by
  the serving process (tagged `dpoflow-served`) and run in it, for as long as it runs.

A pipeline is one or the other, decided by `deploy.work_pool`, and each command refuses a name the
other one owns. Deployments without either tag are never touched.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpoflow.base.config import PipelineConfig, validate_file

MANAGED_TAG = "dpoflow-managed"
SERVED_TAG = "dpoflow-served"
FLOW_NAME = "dpoflow-deployment"
# A module path, not a file: it resolves wherever dpoflow is importable (the clone a git_clone pull
# step made, whose root is first on the path, or the installed package).
ENTRYPOINT = "dpoflow.flows.deployed.deployed_pipeline"
COMPARED = ("description", "parameters", "schedules", "paused", "work_pool_name", "work_queue_name", "tags",
            "job_variables", "entrypoint", "pull_steps", "concurrency_limit")


class DeployError(ValueError):
    """A deployment change that cannot be made; nothing was changed on the server."""


@dataclass
class Change:
    action: str  # create | update | delete | unchanged
    name: str
    fields: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # name -> (now, wanted)
    wanted: dict[str, Any] | None = None
    deployment_id: Any = None

    def line(self) -> str:
        if self.action in ("create", "delete", "unchanged"):
            return f"{self.action:9} {self.name}"
        parts = [f"{k}: {now!r} -> {wanted!r}" for k, (now, wanted) in self.fields.items()]
        return f"update    {self.name}: " + "; ".join(parts)


def code_root(file: Path) -> Path:
    """The git checkout holding the pipelines file (the folder itself outside git)."""
    out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=file.parent, capture_output=True, text=True)
    return Path(out.stdout.strip()) if out.returncode == 0 else file.parent


def head_commit(root: Path) -> str | None:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def deployed_configs(file: Path) -> tuple[list[PipelineConfig], list[PipelineConfig]]:
    """(work-pool pipelines, served pipelines) among those with deploy.enabled; every pipeline is
    validated first."""
    enabled = [c for c in validate_file(file) if c.deploy.enabled]
    return [c for c in enabled if c.deploy.work_pool], [c for c in enabled if not c.deploy.work_pool]


def wanted_deployments(file: Path, commit: str | None = None) -> dict[str, dict[str, Any]]:
    """pipeline name -> the deployment's fields, for the pipelines a work pool runs."""
    file = file.resolve()
    root = code_root(file)
    commit = commit or head_commit(root)
    pooled, _ = deployed_configs(file)
    return {c.name: _fields(c, root, str(file.relative_to(root)), commit) for c in pooled}


def _fields(config: PipelineConfig, root: Path, file: str, commit: str | None) -> dict[str, Any]:
    d = config.deploy
    if d.repository:
        if not commit:
            raise DeployError(f"{config.name}: deploy.repository is set but no commit is known (not a git checkout?)")
        pull = [{"prefect.deployments.steps.git_clone": {"repository": d.repository, "commit_sha": commit}}]
    else:
        if os.environ.get("CI"):  # GitHub Actions and most CI systems set it
            raise DeployError(
                f"{config.name}: deploy.work_pool without deploy.repository makes workers run the code in the "
                f"folder sync ran in ({root}), which on CI is the runner's temporary checkout: set deploy.repository")
        pull = [{"prefect.deployments.steps.set_working_directory": {"directory": str(root)}}]
    return {
        "description": config.description or f"dpoflow pipeline {config.name}",
        "parameters": {"pipeline_name": config.name, "file": file},
        "schedules": [s.model_dump() for s in d.schedules],
        "paused": d.paused,
        "work_pool_name": d.work_pool,
        "work_queue_name": d.work_queue or "default",
        "tags": deployment_tags(config, MANAGED_TAG),
        "job_variables": d.job_variables,
        "entrypoint": ENTRYPOINT,
        "pull_steps": pull,
        "concurrency_limit": d.concurrency_limit,
    }


def deployment_tags(config: PipelineConfig, kind: str) -> list[str]:
    return sorted({kind, f"dpoflow-pipeline:{config.name}", *config.deploy.tags})


def _schedule_dict(schedule) -> dict[str, Any]:
    """A server schedule in the file's terms (cron/interval_seconds, timezone, active)."""
    s = schedule.schedule
    cron = getattr(s, "cron", None)
    interval = getattr(s, "interval", None)
    return {"cron": cron, "interval_seconds": int(interval.total_seconds()) if interval is not None else None,
            "timezone": getattr(s, "timezone", None) or "UTC", "active": schedule.active}


def _current_fields(deployment) -> dict[str, Any]:
    limit = deployment.global_concurrency_limit
    return {
        "description": deployment.description,
        "parameters": deployment.parameters,
        "schedules": [_schedule_dict(s) for s in deployment.schedules],
        "paused": deployment.paused,
        "work_pool_name": deployment.work_pool_name,
        "work_queue_name": deployment.work_queue_name,
        "tags": sorted(deployment.tags),
        "job_variables": deployment.job_variables or {},
        "entrypoint": deployment.entrypoint,
        "pull_steps": deployment.pull_steps or [],
        "concurrency_limit": limit.limit if limit is not None else None,
    }


def _read_deployments(client, tag: str) -> dict[str, Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags, FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import DeploymentSort

    found = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
                                    deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[tag])),
                                    limit=200, sort=DeploymentSort.NAME_ASC)
    return {d.name: d for d in found}


def managed_deployments(client) -> dict[str, Any]:
    return _read_deployments(client, MANAGED_TAG)


def plan(wanted: dict[str, dict[str, Any]], current: dict[str, Any]) -> list[Change]:
    changes = []
    for name, fields in sorted(wanted.items()):
        if name not in current:
            changes.append(Change("create", name, wanted=fields))
            continue
        now = _current_fields(current[name])
        differ = {k: (now[k], fields[k]) for k in COMPARED if now[k] != fields[k]}
        changes.append(Change("update" if differ else "unchanged", name, differ, fields, current[name].id))
    for name, deployment in sorted(current.items()):
        if name not in wanted:
            changes.append(Change("delete", name, deployment_id=deployment.id))
    return changes


def _schedule_objects(fields: dict[str, Any]) -> list[Any]:
    from datetime import timedelta

    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

    return [CronSchedule(cron=s["cron"], timezone=s["timezone"]) if s["cron"] else
            IntervalSchedule(interval=timedelta(seconds=s["interval_seconds"]), timezone=s["timezone"])
            for s in fields["schedules"]]


def _schedules(fields: dict[str, Any], action: type) -> list[Any]:
    """The file's schedules as the server's create or update action (DeploymentScheduleCreate on
    create, DeploymentScheduleUpdate on update: the update endpoint takes only the latter)."""
    return [action(schedule=schedule, active=s["active"])
            for schedule, s in zip(_schedule_objects(fields), fields["schedules"])]


def _concurrency_options(fields: dict[str, Any]):
    """Runs past the limit wait in line (ENQUEUE) rather than being cancelled."""
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy, ConcurrencyOptions

    if fields["concurrency_limit"] is None:
        return None
    return ConcurrencyOptions(collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def parameter_schema(pipeline_name: str | None = None) -> dict[str, Any]:
    """The typed form the Prefect UI shows for a run: the deployed flow's parameters (overrides is
    PipelineConfig with every field optional). For a deployment, its pipeline and file are fixed
    values, shown but not editable (Prefect's own `freeze` marks them the same way)."""
    from prefect.utilities.callables import parameter_schema as schema_of

    from dpoflow.flows.deployed import deployed_pipeline

    schema = schema_of(deployed_pipeline.fn).model_dump_for_openapi()
    if pipeline_name is not None:
        schema["properties"]["pipeline_name"].update(enum=[pipeline_name], default=pipeline_name, readOnly=True)
        schema["properties"]["file"]["readOnly"] = True
        schema["required"] = [r for r in schema.get("required", []) if r != "pipeline_name"]
    return schema


def apply(client, changes: list[Change]) -> None:
    from prefect.client.schemas.actions import DeploymentScheduleCreate, DeploymentScheduleUpdate, DeploymentUpdate
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    flow_id = client.create_flow_from_name(FLOW_NAME) if any(c.action == "create" for c in changes) else None
    for c in changes:
        if c.action == "create":
            w = c.wanted
            client.create_deployment(
                flow_id=flow_id, name=c.name, description=w["description"], parameters=w["parameters"],
                schedules=_schedules(w, DeploymentScheduleCreate), paused=w["paused"],
                work_pool_name=w["work_pool_name"], work_queue_name=w["work_queue_name"], tags=w["tags"],
                job_variables=w["job_variables"], entrypoint=w["entrypoint"], pull_steps=w["pull_steps"],
                parameter_openapi_schema=parameter_schema(c.name), enforce_parameter_schema=True,
                concurrency_limit=w["concurrency_limit"], concurrency_options=_concurrency_options(w))
        elif c.action == "update":
            update = {k: c.wanted[k] for k in c.fields if k not in ("schedules", "concurrency_limit")}
            if "schedules" in c.fields:  # replacing schedules also replaces their scheduled runs: only when changed
                update["schedules"] = _schedules(c.wanted, DeploymentScheduleUpdate)
            if "concurrency_limit" in c.fields:
                update["concurrency_limit"] = c.wanted["concurrency_limit"]
                update["concurrency_options"] = _concurrency_options(c.wanted)
            client.update_deployment(c.deployment_id, DeploymentUpdate(
                **update, parameter_openapi_schema=parameter_schema(c.name), enforce_parameter_schema=True))
        elif c.action == "delete":
            scheduled = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[c.deployment_id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
                limit=200, sort=FlowRunSort.EXPECTED_START_TIME_ASC)
            for run in scheduled:
                client.delete_flow_run(run.id)
            client.delete_deployment(c.deployment_id)


def _require_work_pools(client, wanted: dict[str, dict[str, Any]]) -> None:
    """Work pools are infrastructure (job templates, GPU settings) that someone sets up once; sync names
    the missing ones instead of failing half-way."""
    from prefect.exceptions import ObjectNotFound

    missing = {}
    for name, fields in wanted.items():
        pool = fields["work_pool_name"]
        if pool and pool not in missing:
            try:
                client.read_work_pool(pool)
            except ObjectNotFound:
                missing[pool] = name
    if missing:
        raise DeployError("; ".join(f"work pool {pool!r} (deploy.work_pool of {name}) does not exist: create it "
                                    f"with `prefect work-pool create {pool} --type process` (or docker, kubernetes)"
                                    for pool, name in missing.items()))


def _refuse_names_owned_elsewhere(client, names, own_tag: str) -> None:
    """A deployment name belongs to sync or to serve: registering it from the other would overwrite it
    (the server upserts by flow and deployment name)."""
    from prefect.exceptions import ObjectNotFound

    for name in sorted(names):
        try:
            existing = client.read_deployment_by_name(f"{FLOW_NAME}/{name}")
        except ObjectNotFound:
            continue
        if own_tag in existing.tags:
            continue
        owner = ("`dpoflow serve` (it has no deploy.work_pool there)" if SERVED_TAG in existing.tags else
                 "`dpoflow sync` (a work pool runs it)" if MANAGED_TAG in existing.tags else "something other than dpoflow")
        raise DeployError(f"deployment {FLOW_NAME}/{name} already exists, registered by {owner}; stop that, then "
                          f"remove it with `prefect deployment delete {FLOW_NAME}/{name}`, or rename the pipeline")


def connect(client) -> None:
    """Fail in one line, before anything changes, when the server cannot be reached."""
    from prefect.settings import get_current_settings

    error = client.api_healthcheck()
    if error is not None:
        raise DeployError(f"cannot reach the Prefect server at {get_current_settings().api.url}: "
                          f"{type(error).__name__}: {error}")


def sync(file: Path, dry_run: bool = False, commit: str | None = None) -> tuple[list[Change], list[str]]:
    """The changes (made unless `dry_run`) and notes on what sync leaves to others (served pipelines)."""
    from prefect.client.orchestration import get_client

    wanted = wanted_deployments(file, commit)
    _, served = deployed_configs(file.resolve())
    notes = [f"serve     {c.name} (no deploy.work_pool: `dpoflow serve` registers and runs it)" for c in served]
    with get_client(sync_client=True) as client:
        connect(client)
        _require_work_pools(client, wanted)
        _refuse_names_owned_elsewhere(client, wanted, MANAGED_TAG)
        changes = plan(wanted, managed_deployments(client))
        if not dry_run:
            apply(client, changes)
    return changes, notes


def served_deployments(file: Path) -> list[Any]:
    """The RunnerDeployments `dpoflow serve` registers: the deploy-enabled pipelines without a work pool."""
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.types.entrypoint import EntrypointType
    from prefect.utilities.annotations import freeze

    from dpoflow.flows.deployed import deployed_pipeline

    file = file.resolve()
    pooled, served = deployed_configs(file)
    if not served:
        pooled_names = ", ".join(c.name for c in pooled)
        raise DeployError(f"{file}: no pipeline has deploy.enabled without a deploy.work_pool"
                          + (f" ({pooled_names}: run by work pool workers, see `dpoflow sync`)" if pooled else ""))
    out = []
    for config in served:
        d = config.deploy
        fields = {"schedules": [s.model_dump() for s in d.schedules]}
        out.append(deployed_pipeline.to_deployment(
            name=config.name, description=config.description or f"dpoflow pipeline {config.name}",
            # The pipelines file is passed absolute and resolves its own relative paths.
            parameters={"pipeline_name": freeze(config.name), "file": freeze(str(file))},
            schedules=_schedules(fields, DeploymentScheduleCreate), paused=d.paused,
            tags=deployment_tags(config, SERVED_TAG),
            concurrency_limit=d.concurrency_limit and ConcurrencyLimitConfig(
                limit=d.concurrency_limit, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
            entrypoint_type=EntrypointType.MODULE_PATH))
    return out


def serve(file: Path) -> None:
    """Serve the deploy-enabled pipelines without a work pool from this process (Prefect's `serve`):
    their schedules and UI-triggered runs execute here."""
    from prefect import serve as prefect_serve
    from prefect.client.orchestration import get_client

    deployments = served_deployments(file)
    with get_client(sync_client=True) as client:
        connect(client)
        _refuse_names_owned_elsewhere(client, [d.name for d in deployments], SERVED_TAG)
    prefect_serve(*deployments)
