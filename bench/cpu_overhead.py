"""What the pipeline itself costs on CPU: the demo run's wall time against the time spent inside the
stage functions (the work: loading, training, scoring, exporting). The rest is overhead: Python
imports, Prefect's embedded server and task orchestration, content hashing, the cache, run folders and
reports.

Each run is a fresh `dpoflow run demo` process (README command 1 without the install) on a fresh
workspace: first with nothing cached, then again with everything cached.

    OMP_NUM_THREADS=2 python bench/cpu_overhead.py [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STARTED = time.perf_counter()  # before the worker's imports, which count as overhead

TASKS = ("model_task", "prepare_task", "sft_task", "reference_task", "dpo_task", "start_scores_task",
         "evaluate_task", "export_task", "card_task", "publish_task")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline", default="demo")
    parser.add_argument("--runs", type=int, default=2, help="the first runs cold, the others find it cached")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.pipeline, Path(args.worker))), flush=True)
        return

    from common import run_worker

    workdir = Path(tempfile.mkdtemp()) / ".dpoflow"
    rows = []
    for i in range(args.runs):
        began = time.perf_counter()
        result, proc = run_worker([__file__, "--pipeline", args.pipeline, "--worker", str(workdir)], cwd=REPO)
        wall = time.perf_counter() - began
        if result is None:
            sys.exit(f"run {i + 1} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        work = sum(result["stage_work_s"].values())
        rows.append({"run": "cold" if i == 0 else "cached", "wall_s": round(wall, 1),
                     "until_first_stage_s": result["until_first_stage_s"], "stage_work_s": round(work, 1),
                     "overhead_s": round(wall - work, 1), "overhead_share": round((wall - work) / wall, 3),
                     "stages": result["stage_work_s"]})
        print(json.dumps(rows[-1]), flush=True)
    print("| run | wall s | stage work s | overhead s | overhead share | until the first stage starts s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['wall_s']} | {r['stage_work_s']} | {r['overhead_s']} | {r['overhead_share']:.1%} "
              f"| {r['until_first_stage_s']} |")


def worker(pipeline: str, workdir: Path) -> dict:
    """One `dpoflow run` in this process, with each stage task's function timed from the inside."""
    import functools

    sys.path.insert(0, str(REPO))
    from dpoflow.app import cli
    from dpoflow.flows import pipeline as flow_module

    work: dict[str, float] = {}
    marks: dict[str, float] = {}
    for name in TASKS:
        task = getattr(flow_module, name)
        inner = task.fn

        @functools.wraps(inner)
        def timed(*args, _inner=inner, **kwargs):
            began = time.perf_counter()
            marks.setdefault("first_stage", began)
            try:
                return _inner(*args, **kwargs)
            finally:
                stage = _inner.__name__.removesuffix("_task")
                work[stage] = round(work.get(stage, 0.0) + time.perf_counter() - began, 2)

        task.fn = timed
    code = cli.main(["run", pipeline, "-f", str(REPO / "pipelines.yaml"), "--set", f"workdir={workdir}"])
    if code != 0:
        raise SystemExit(f"dpoflow run {pipeline} exited {code}")
    return {"stage_work_s": work, "until_first_stage_s": round(marks["first_stage"] - STARTED, 1) if marks else None}


if __name__ == "__main__":
    main()
