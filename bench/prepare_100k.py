"""The prepare stage on N synthetic pairs of mixed formats (~1 KB each), on this machine's CPU.
Prints wall time, pairs/s and peak RSS; run it at two sizes to see memory stay flat in the data size
(only the dedup index and the per-pair sample ranks grow).

    python bench/prepare_100k.py --pairs 100000
    python bench/prepare_100k.py --pairs 25000

Formats, a quarter each: explicit JSONL, conversational JSONL (UltraFeedback-binarized style),
implicit HH-RLHF JSONL, and scored completions in Parquet (3 completions, best vs worst). 1% of rows
are exact duplicates and 0.5% are broken JSON, so the cleaning paths run too.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = (REPO / "dpoflow" / "builtin" / "tiny_corpus.txt").read_text().split()


def text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def make_data(folder: Path, pairs: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    quarter = pairs // 4
    files = {name: open(folder / f"{name}.jsonl", "w") for name in ("explicit", "conversational", "implicit")}

    def emit(name: str, row: dict, i: int) -> None:
        line = json.dumps(row) + "\n"
        files[name].write(line)
        if i % 100 == 0:
            files[name].write(line)  # an exact duplicate
        if i % 200 == 0:
            files[name].write("{broken json\n")

    for i in range(quarter):  # ~1 KB a pair: a 60-word prompt and two 50-word answers
        p, c, r = text(rng, 60), text(rng, 50), text(rng, 50)
        emit("explicit", {"prompt": p, "chosen": c, "rejected": r}, i)
        p, c, r = text(rng, 60), text(rng, 50), text(rng, 50)
        conv = [{"role": "user", "content": p}]
        emit("conversational", {"chosen": conv + [{"role": "assistant", "content": c}],
                                "rejected": conv + [{"role": "assistant", "content": r}]}, i)
        p, c, r = text(rng, 60), text(rng, 50), text(rng, 50)
        emit("implicit", {"chosen": f"\n\nHuman: {p}\n\nAssistant: {c}", "rejected": f"\n\nHuman: {p}\n\nAssistant: {r}"}, i)
    for f in files.values():
        f.close()
    scored = [{"prompt": text(rng, 60), "completions": [{"response": text(rng, 50), "score": s} for s in (8, 5, 2)]}
              for _ in range(pairs - 3 * quarter)]
    pq.write_table(pa.Table.from_pylist(scored), folder / "scored.parquet")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--max-length", type=int, default=1024)
    args = parser.parse_args()

    from dpoflow.base.config import DataSpec
    from dpoflow.base.records import ModelRef
    from dpoflow.tasks.prepare import prepare_data
    from dpoflow.engine.tiny import build_tiny_model

    from common import scratch

    work = scratch()
    model = build_tiny_model("tiny-llama", work / "model")
    # Written by a child process, so the data's generation doesn't count towards this one's peak RSS.
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=make_data, args=(work, args.pairs))
    child.start()
    child.join()
    files = [work / f"{n}.jsonl" for n in ("explicit", "conversational", "implicit")] + [work / "scored.parquet"]
    size = sum(f.stat().st_size for f in files)
    base = ModelRef(path=str(model), digest="bench", source="builtin:tiny-llama", role="base")
    spec = DataSpec(sources=[str(f) for f in files])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    began = time.perf_counter()
    out = prepare_data([str(f) for f in files], spec, base, work / "out", max_length=args.max_length,
                       eval_tasks=("dpoflow_knowledge", "dpoflow_arithmetic", "dpoflow_reading",
                                   "dpoflow_instructions"))
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"pairs": args.pairs, "input_mib": round(size / 2**20, 1), "seconds": round(seconds, 1),
                      "pairs_per_s": round(out.counts["read"] / seconds), "peak_rss_mib": round(peak),
                      "rss_before_mib": round(rss_before), "counts": out.counts}))


if __name__ == "__main__":
    main()
