"""`dpoflow prepare` as a user runs it, on data files holding lines that once crashed the stage, mixed
with good ones: it finishes, sets each bad line aside with file:line and its rule, and the counts add up."""

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

PIPELINES = """
pipelines:
  hostile:
    cpu_threads: 1
    model: {source: builtin:tiny-llama}
    data:
      sources: [pairs.jsonl, excel.csv]
      heldout_fraction: 0.2
    dpo: {max_length: 128}
"""


def test_prepare_sets_hostile_lines_aside_and_finishes(tmp_path):
    good = [json.dumps({"prompt": f"jsonl question {i}?", "chosen": f"yes {i}", "rejected": f"no {i}"})
            for i in range(40)]
    hostile = ['{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}',  # a lone surrogate
               "[" * 100_000,  # nesting too deep for any JSON decoder that recurses
               '{"prompt": "n", "chosen": "a", "rejected": "b", "id": ' + "9" * 5000 + "}"]  # past int's limit
    lines = good[:20] + hostile + good[20:]
    # Both files start with a UTF-8 BOM, as Windows editors and Excel write them.
    (tmp_path / "pairs.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    csv_rows = ["prompt,chosen,rejected"] + [f"csv question {i}?,yes {i},no {i}" for i in range(20)]
    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(csv_rows).encode() + b"\r\n")
    (tmp_path / "pipelines.yaml").write_text(PIPELINES)

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-m", "dpoflow", "prepare", "hostile", "-f", str(tmp_path / "pipelines.yaml"),
                           "--set", f"workdir={tmp_path / 'work'}"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert re.search(r"## Data: 63 items read, \d+ train \+ \d+ held-out kept, 3 set aside", proc.stdout), proc.stdout
    assert f"| {tmp_path / 'pairs.jsonl'} | 43 | 40 | bad_json 2, not_utf8 1 |" in proc.stdout
    assert f"| {tmp_path / 'excel.csv'} | 20 | 20 | - |" in proc.stdout

    rejected_file = next(line.split(":", 1)[1].strip() for line in proc.stdout.splitlines()
                         if line.startswith("set aside:"))
    with open(rejected_file, encoding="utf-8") as f:
        rejected = [json.loads(line) for line in f]
    src = tmp_path / "pairs.jsonl"
    assert [(r["source"], r["reason"], r["field"], r["detail"]) for r in rejected] == [
        (f"{src}:21", "not_utf8", "prompt", "lone surrogate \\ud800: not valid Unicode text"),
        (f"{src}:22", "bad_json", None, "nested too deeply to decode"),
        (f"{src}:23", "bad_json", "id", "a number of 5000 digits (at most 100)"),
    ]
    assert rejected[0]["row"] == {"prompt": "\ud800", "chosen": "a", "rejected": "b"}  # written back as read
