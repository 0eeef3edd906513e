import os
import sys
from pathlib import Path

# Tiny models on a 2-core machine: one thread, or steps get many times slower under any other load.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from dpoflow.tiny import build_tiny_model

    return build_tiny_model("tiny-llama", tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def python() -> str:
    return sys.executable
