import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Tiny models on a 2-core machine: one thread, or steps get many times slower under any other load.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test Hub server (tests/hubserver.py) speaks the classic LFS upload protocol, not Xet; huggingface_hub
# reads this when it is first imported, so it is set before any test imports it.
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
# Trackio reads its folder (TRACKIO_DIR) once, when something in the process first imports it: one
# folder for each test process, set before anything can, never the user's ~/.cache
# (tests/test_tracking_trackio.py writes its runs there; the CLI's runs choose their own).
if "TRACKIO_DIR" not in os.environ:
    os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="dpoflow-tests-trackio-")
    atexit.register(shutil.rmtree, os.environ["TRACKIO_DIR"], ignore_errors=True)
# The CLI's startup allowance for Prefect's temporary server (dpoflow.base.runtime), for tests that run
# flows in this process too, set before Prefect reads its settings: under pytest-xdist the machine is
# loaded and the server's default 20 s ran out. (Not all of the CLI's defaults: the UI must stay on for
# the servers the deployment tests start.)
from dpoflow.base.runtime import PREFECT_DEFAULTS  # noqa: E402

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
                      PREFECT_DEFAULTS["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])

import pytest  # noqa: E402
from cli_runs import demo_command  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)


# Modules that share the session's demo workdir (demo_first_run): one xdist worker runs them all, so
# the demo trains once.
DEMO_HOME_MODULES = ("tests/e2e/test_demo.py", "tests/e2e/test_judge.py")


def pytest_xdist_make_scheduler(config, log):
    """Under `-n 2 --dist loadfile` (the README's test command) each module runs on one worker, so its
    module-scoped fixtures (a trained demo, a server) are built once; the demo's modules share one."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False  # keep pytest_collection_modifyitems' order: the longest first

    class ModuleScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            return DEMO_HOME_MODULES[0] if module in DEMO_HOME_MODULES else module

    return ModuleScheduling(config, log)


# The longest module by far (Gemma 3 270M on CPU, ~12 minutes): started first, so no worker waits on it.
LONGEST_MODULE = "test_demo_real.py"


def pytest_collection_modifyitems(config, items):
    # The end-to-end modules first, the longest of them at the head, so that no long one starts last.
    items.sort(key=lambda item: (item.path.parent.name != "e2e", item.path.name != LONGEST_MODULE))
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
    from dpoflow.engine.tiny import build_tiny_model

    return build_tiny_model("tiny-llama", tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory) -> Path:
    """One workdir and Prefect home for the end-to-end modules that run the `demo` pipeline through the
    CLI (test_demo, test_judge): `demo_first_run` trains everything once, and each module's later runs
    find what they do not change cached, as a user's next run does."""
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="session")
def demo_first_run(repo, demo_home) -> subprocess.CompletedProcess:
    """The demo's first run, on a fresh workdir: every stage runs."""
    cmd, env = demo_command(repo, demo_home)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture
def yes_no_pairs(tiny_model, tmp_path):
    """(start model record, prepared-data record) for 16 rendered yes/no pairs: enough for a few steps."""
    from dpoflow.base.artifacts import write_jsonl
    from dpoflow.base.records import ModelRef, PreparedData

    rows = [{"prompt": f"<|begin|><|user|>\nquestion {i}<|end|>\n<|assistant|>\n", "chosen": "yes<|end|>",
             "rejected": "no<|end|>"} for i in range(16)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    data = PreparedData(path=str(tmp_path), digest="test", train=str(tmp_path / "train.jsonl"), heldout="",
                        rejected="", counts={})
    start = ModelRef(path=str(tiny_model), digest="test", source="builtin:tiny-llama", role="base")
    return start, data, rows
