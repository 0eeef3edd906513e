"""Writes sentiment.jsonl, the demo's preference data: a verifiable task (the chosen answer is the
correct sentiment label of a short review), so the effect of DPO on held-out prompts can be measured.

Run from anywhere: `python data/demo/make_sentiment.py`. The output is deterministic; the file is
committed so the demo needs no generator at run time.
"""

import json
import random
from pathlib import Path

POSITIVE = ["wonderful", "excellent", "delightful", "superb", "lovely", "great", "fantastic",
            "charming", "pleasant", "brilliant", "friendly", "amazing"]
NEGATIVE = ["terrible", "awful", "dreadful", "horrible", "bland", "rude", "disappointing",
            "boring", "poor", "dull", "noisy", "broken"]
SUBJECTS = ["food", "service", "movie", "hotel room", "concert", "book", "staff", "coffee",
            "delivery", "game", "show", "app", "camera", "lesson", "museum tour", "pizza"]
TEMPLATES = [
    "The {s} was {a}.",
    "Honestly, the {s} was {a}.",
    "I thought the {s} was {a}.",
    "Our {s} was {a} this time.",
    "What a {a} {s}!",
    "The {s}? Simply {a}.",
]
INSTRUCTION = "Classify the sentiment of this review as positive or negative."


def main(n_pairs: int = 640, seed: int = 1234) -> None:
    rng = random.Random(seed)
    combos = [(t, s, a, label) for t in TEMPLATES for s in SUBJECTS
              for words, label in ((POSITIVE, "positive"), (NEGATIVE, "negative")) for a in words]
    rng.shuffle(combos)
    out = Path(__file__).with_name("sentiment.jsonl")
    with out.open("w", encoding="utf-8") as f:
        for template, subject, adjective, label in combos[:n_pairs]:
            other = "negative" if label == "positive" else "positive"
            review = template.format(s=subject, a=adjective)
            row = {"prompt": f"{INSTRUCTION}\nReview: {review}", "chosen": label, "rejected": other}
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
