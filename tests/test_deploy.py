"""What `dpoflow sync` asks for, from a pipelines file (the server side is tests/e2e/test_deployments.py)."""

from dpoflow.app.deploy import ENTRYPOINT, MANAGED_TAG, wanted_deployments
from dpoflow.base.overrides import PipelineOverrides, as_set_items


def test_deployments_pull_the_code_at_the_pinned_commit(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')  # validated to exist
    (tmp_path / "pipelines.yaml").write_text(
        "pipelines:\n"
        "  nightly:\n    data: {sources: [d.jsonl]}\n"
        "    deploy: {enabled: true, repository: 'https://example.com/team/models.git', work_pool: gpu,\n"
        "             schedules: [{cron: '0 2 * * *'}], job_variables: {image: 'dpoflow:gpu'}}\n"
        "  manual:\n    data: {sources: [d.jsonl]}\n")
    wanted = wanted_deployments(tmp_path / "pipelines.yaml", commit="abc123")
    assert list(wanted) == ["nightly"]
    w = wanted["nightly"]
    assert w["pull_steps"] == [{"prefect.deployments.steps.git_clone": {
        "repository": "https://example.com/team/models.git", "commit_sha": "abc123"}}]
    assert w["parameters"] == {"pipeline_name": "nightly", "file": "pipelines.yaml"}
    assert w["entrypoint"] == ENTRYPOINT and MANAGED_TAG in w["tags"]
    assert (w["work_pool_name"], w["work_queue_name"], w["job_variables"]) == ("gpu", "default", {"image": "dpoflow:gpu"})
    assert w["schedules"] == [{"cron": "0 2 * * *", "interval_seconds": None, "timezone": "UTC", "active": True}]


def test_run_overrides_are_a_typed_partial_config_applied_like_set():
    overrides = PipelineOverrides.model_validate({"dpo": {"beta": 0.3, "loss_type": ["sigmoid", "sft"]},
                                                  "evaluate": {"gate": {"mode": "warn"}}})
    assert as_set_items(overrides) == ['dpo.beta=0.3', 'dpo.loss_type=["sigmoid", "sft"]', 'evaluate.gate.mode="warn"']
    import pydantic
    import pytest

    with pytest.raises(pydantic.ValidationError):
        PipelineOverrides.model_validate({"dpo": {"betta": 0.3}})
    with pytest.raises(pydantic.ValidationError):
        PipelineOverrides.model_validate({"name": "other"})  # a run cannot become another pipeline


def test_a_run_without_overrides_sets_nothing():
    """A schedule, the UI's plain Run and `prefect deployment run` pass no overrides, `{}`, or sections
    left empty in the form: none of them changes the file's config."""
    assert as_set_items(None) == [] and as_set_items({}) == []
    assert as_set_items({"dpo": {}, "evaluate": {"gate": {}}}) == []
    assert as_set_items(PipelineOverrides.model_validate({})) == []
    assert as_set_items({"dpo": {"beta": None, "max_steps": 3}}) == ["dpo.max_steps=3"]


def test_only_pool_pipelines_are_synced_and_ci_needs_a_repository(tmp_path, monkeypatch):
    import pytest

    from dpoflow.app.deploy import DeployError, deployed_configs

    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')  # validated to exist
    (tmp_path / "pipelines.yaml").write_text(
        "pipelines:\n"
        "  pooled:\n    data: {sources: [d.jsonl]}\n    deploy: {enabled: true, work_pool: gpu}\n"
        "  served:\n    data: {sources: [d.jsonl]}\n    deploy: {enabled: true}\n")
    pooled, served = deployed_configs(tmp_path / "pipelines.yaml")
    assert [c.name for c in pooled] == ["pooled"] and [c.name for c in served] == ["served"]
    monkeypatch.delenv("CI", raising=False)
    w = wanted_deployments(tmp_path / "pipelines.yaml", commit="abc")
    assert list(w) == ["pooled"] and w["pooled"]["concurrency_limit"] == 1
    assert w["pooled"]["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    monkeypatch.setenv("CI", "true")
    with pytest.raises(DeployError, match="deploy.work_pool without deploy.repository"):
        wanted_deployments(tmp_path / "pipelines.yaml", commit="abc")


def test_sync_checks_data_in_the_repository_not_on_the_workers_disk(tmp_path, monkeypatch):
    """A work pool's runs read data on the worker: `sync` (e.g. on CI) cannot see a worker's volume, so
    it checks only the paths inside the repository it syncs."""
    import pytest

    from dpoflow.base.config import ConfigError

    monkeypatch.delenv("CI", raising=False)
    (tmp_path / "pipelines.yaml").write_text(
        "pipelines:\n"
        "  on-worker:\n    data: {sources: [/srv/volume/pairs.jsonl]}\n    deploy: {enabled: true, work_pool: gpu}\n"
        "  in-repo:\n    data: {sources: [missing.jsonl]}\n    deploy: {enabled: true, work_pool: gpu}\n")
    with pytest.raises(ConfigError) as e:
        wanted_deployments(tmp_path / "pipelines.yaml", commit="abc")
    assert len(e.value.problems) == 1 and "missing.jsonl: data file not found" in e.value.problems[0]
    (tmp_path / "missing.jsonl").write_text("{}\n")
    assert set(wanted_deployments(tmp_path / "pipelines.yaml", commit="abc")) == {"on-worker", "in-repo"}
