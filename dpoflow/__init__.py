"""dpoflow: preference alignment (SFT + DPO) for LLMs as cached Prefect flows."""

from pathlib import Path

# Installed, flows/ and tasks/ are the subpackages dpoflow.flows and dpoflow.tasks (pyproject.toml maps
# them). From a bare source checkout that was never pip-installed (a GPU box running bench/), the same
# names resolve through the checkout's root.
_root = Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "tasks" / "__init__.py").is_file():
    __path__.append(str(_root))
