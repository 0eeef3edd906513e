"""Writes feedback.jsonl, the demo's unpaired data (thumbs-up/down rows for `dpo.method: kto`), from
sentiment.jsonl: each pair's prompt with one of its two answers, the chosen one labelled true or the
rejected one labelled false, picked by a seeded coin, so every prompt has one answer and one label.

Run from anywhere: `python data/demo/make_feedback.py`. The output is deterministic; the file is committed
so the demo needs no generator at run time.
"""

import json
import random
from pathlib import Path


def main(seed: int = 1234) -> None:
    rng = random.Random(seed)
    folder = Path(__file__).parent
    pairs = [json.loads(line) for line in (folder / "sentiment.jsonl").read_text(encoding="utf-8").splitlines()]
    with (folder / "feedback.jsonl").open("w", encoding="utf-8") as f:
        for pair in pairs:
            liked = rng.random() < 0.5
            row = {"prompt": pair["prompt"], "completion": pair["chosen" if liked else "rejected"], "label": liked}
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
