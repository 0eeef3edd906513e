"""Which process of a training stage this is: torchrun's environment, read by the stage code on every
rank (dpoflow.engine.distributed launches the ranks); one process when nothing launched it."""

from __future__ import annotations

import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
