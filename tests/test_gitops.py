"""The GitOps workflow: on a pull request it validates and shows the deployment diff without
changing anything; on main it syncs, pinning the deployments to the pushed commit."""

import yaml


def test_pull_requests_plan_and_main_syncs(repo):
    workflow = yaml.safe_load((repo / ".github" / "workflows" / "dpoflow.yml").read_text())
    triggers = workflow[True] if True in workflow else workflow["on"]  # YAML 1.1 reads `on` as true
    assert "pull_request" in triggers and triggers["push"]["branches"] == ["main"]
    plan, sync = workflow["jobs"]["plan"], workflow["jobs"]["sync"]
    plan_steps = " ".join(step.get("run", "") for step in plan["steps"])
    sync_steps = " ".join(step.get("run", "") for step in sync["steps"])
    assert plan["if"] == "github.event_name == 'pull_request'" and sync["if"] == "github.event_name == 'push'"
    assert "dpoflow validate" in plan_steps and "dpoflow sync --dry-run" in plan_steps
    assert "GITHUB_STEP_SUMMARY" in plan_steps
    assert "dpoflow sync --commit \"$GITHUB_SHA\"" in sync_steps and "--dry-run" not in sync_steps
    for name in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING"):
        assert workflow["env"][name] == "${{ secrets.%s }}" % name


def test_every_commit_to_main_resyncs_and_forks_are_validated_without_secrets(repo):
    """Deployments pin the synced commit: a commit that changes only data must move the pin too."""
    workflow = yaml.safe_load((repo / ".github" / "workflows" / "dpoflow.yml").read_text())
    triggers = workflow[True] if True in workflow else workflow["on"]
    assert "paths" not in (triggers["push"] or {}) and "paths" not in (triggers["pull_request"] or {})
    steps = {step.get("name"): step for step in workflow["jobs"]["plan"]["steps"]}
    assert steps["deployment diff"]["if"] == "github.event.pull_request.head.repo.full_name == github.repository"
    assert "if" not in steps["validate"]
    image = workflow["jobs"]["image"]
    assert image["if"] == "github.event_name == 'push'"
    assert any(step.get("uses", "").startswith("docker/build-push-action") and step["with"]["push"] is True
               for step in image["steps"])
