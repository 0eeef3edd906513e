"""Prefect deployments kept equal to pipelines.yaml (`dpoflow sync`), or served from this machine
(`dpoflow serve`).

Every pipeline with `deploy.enabled` becomes a deployment of the `dpoflow-deployment` flow named after
the pipeline, tagged `dpoflow-managed`. `sync` reads what the server has under that tag, works out
the difference (create, update, delete), prints it, and with `--dry-run` stops there. An unchanged
deployment is not touched, so its id and its scheduled runs stay; one whose pipeline left the file
is deleted with its scheduled runs. Deployments without the tag are never touched.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import PipelineConfig, validate_file

MANAGED_TAG = "dpoflow-managed"
FLOW_NAME = "dpoflow-deployment"
# A module path, not a file: it resolves wherever dpoflow is importable (the clone a git_clone pull
# step made, whose root is first on the path, or the installed package).
ENTRYPOINT = "dpoflow.flows.deployed:deployed_pipeline"
COMPARED = ("description", "parameters", "schedules", "paused", "work_pool_name", "work_queue_name", "tags",
            "job_variables", "entrypoint", "pull_steps")


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


def wanted_deployments(file: Path, commit: str | None = None) -> dict[str, dict[str, Any]]:
    """pipeline name -> the deployment's fields, from the file (every pipeline validated first)."""
    file = file.resolve()
    root = code_root(file)
    commit = commit or head_commit(root)
    out = {}
    for config in validate_file(file):
        if config.deploy.enabled:
            out[config.name] = _fields(config, root, str(file.relative_to(root)), commit)
    return out


def _fields(config: PipelineConfig, root: Path, file: str, commit: str | None) -> dict[str, Any]:
    d = config.deploy
    if d.repository:
        if not commit:
            raise ValueError(f"{config.name}: deploy.repository is set but no commit is known (not a git checkout?)")
        pull = [{"prefect.deployments.steps.git_clone": {"repository": d.repository, "commit_sha": commit}}]
    else:
        pull = [{"prefect.deployments.steps.set_working_directory": {"directory": str(root)}}]
    return {
        "description": config.description or f"dpoflow pipeline {config.name}",
        "parameters": {"pipeline_name": config.name, "file": file},
        "schedules": [s.model_dump() for s in d.schedules],
        "paused": d.paused,
        "work_pool_name": d.work_pool,
        "work_queue_name": (d.work_queue or "default") if d.work_pool else d.work_queue,
        "tags": sorted({MANAGED_TAG, f"dpoflow-pipeline:{config.name}", *d.tags}),
        "job_variables": d.job_variables,
        "entrypoint": ENTRYPOINT,
        "pull_steps": pull,
    }


def _schedule_dict(schedule) -> dict[str, Any]:
    """A server schedule in the file's terms (cron/interval_seconds, timezone, active)."""
    s = schedule.schedule
    cron = getattr(s, "cron", None)
    interval = getattr(s, "interval", None)
    return {"cron": cron, "interval_seconds": int(interval.total_seconds()) if interval is not None else None,
            "timezone": getattr(s, "timezone", None) or "UTC", "active": schedule.active}


def _current_fields(deployment) -> dict[str, Any]:
    return {
        "description": deployment.description,
        "parameters": deployment.parameters,
        "schedules": [_schedule_dict(s) for s in deployment.schedules],
        "paused": deployment.paused,
        "work_pool_name": deployment.work_pool_name,
        "work_queue_name": deployment.work_queue_name if deployment.work_pool_name else None,
        "tags": sorted(deployment.tags),
        "job_variables": deployment.job_variables or {},
        "entrypoint": deployment.entrypoint,
        "pull_steps": deployment.pull_steps or [],
    }


def managed_deployments(client) -> dict[str, Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags
    from prefect.client.schemas.sorting import DeploymentSort

    # limit and sort are passed because Prefect 3.8.8's sync client sends null for them, which its
    # server refuses (422).
    found = client.read_deployments(deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[MANAGED_TAG])),
                                    limit=200, sort=DeploymentSort.NAME_ASC)
    return {d.name: d for d in found}


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


def _schedules(fields: dict[str, Any]):
    from datetime import timedelta

    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

    out = []
    for s in fields["schedules"]:
        schedule = (CronSchedule(cron=s["cron"], timezone=s["timezone"]) if s["cron"] else
                    IntervalSchedule(interval=timedelta(seconds=s["interval_seconds"]), timezone=s["timezone"]))
        out.append(DeploymentScheduleCreate(schedule=schedule, active=s["active"]))
    return out


def parameter_schema() -> dict[str, Any]:
    """The typed form the Prefect UI shows for a run: the deployed flow's parameters (overrides is
    PipelineConfig with every field optional)."""
    from prefect.utilities.callables import parameter_schema as schema_of

    from dpoflow.flows.deployed import deployed_pipeline

    return schema_of(deployed_pipeline.fn).model_dump_for_openapi()


def apply(client, changes: list[Change]) -> None:
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    schema = parameter_schema()
    flow_id = client.create_flow_from_name(FLOW_NAME) if any(c.action == "create" for c in changes) else None
    for c in changes:
        if c.action == "create":
            w = c.wanted
            client.create_deployment(
                flow_id=flow_id, name=c.name, description=w["description"], parameters=w["parameters"],
                schedules=_schedules(w), paused=w["paused"], work_pool_name=w["work_pool_name"],
                work_queue_name=w["work_queue_name"], tags=w["tags"], job_variables=w["job_variables"],
                entrypoint=w["entrypoint"], pull_steps=w["pull_steps"], parameter_openapi_schema=schema,
                enforce_parameter_schema=True)
        elif c.action == "update":
            update = {k: c.wanted[k] for k in c.fields if k != "schedules"}
            if "schedules" in c.fields:  # replacing schedules also replaces their scheduled runs: only when changed
                update["schedules"] = _schedules(c.wanted)
            client.update_deployment(c.deployment_id, DeploymentUpdate(**update, parameter_openapi_schema=schema))
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
        raise ValueError("; ".join(f"work pool {pool!r} (deploy.work_pool of {name}) does not exist: create it "
                                   f"with `prefect work-pool create {pool} --type process` (or docker, kubernetes)"
                                   for pool, name in missing.items()))


def sync(file: Path, dry_run: bool = False, commit: str | None = None) -> list[Change]:
    from prefect.client.orchestration import get_client

    wanted = wanted_deployments(file, commit)
    with get_client(sync_client=True) as client:
        _require_work_pools(client, wanted)
        changes = plan(wanted, managed_deployments(client))
        if not dry_run:
            apply(client, changes)
    return changes


def serve(file: Path) -> None:
    """Serve every deploy-enabled pipeline from this process (Prefect's `serve`): schedules and
    UI-triggered runs execute here, no work pool or worker needed."""
    from prefect import serve as prefect_serve

    from dpoflow.flows.deployed import deployed_pipeline

    file = file.resolve()
    deployments = []
    for name, w in wanted_deployments(file).items():
        deployments.append(deployed_pipeline.to_deployment(
            name=name, description=w["description"], parameters={**w["parameters"], "file": str(file)},
            schedules=_schedules(w), paused=w["paused"], tags=w["tags"]))
    if not deployments:
        raise ValueError(f"{file}: no pipeline has deploy.enabled: true")
    # Runs execute in this process's working directory (Prefect loads the flow relative to it); the
    # pipelines file is passed absolute and resolves its own relative paths.
    prefect_serve(*deployments)
