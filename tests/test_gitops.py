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
    for job in (plan, sync):
        assert job["env"]["PREFECT_API_URL"] == "${{ secrets.PREFECT_API_URL }}"
