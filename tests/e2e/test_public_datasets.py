"""`dpoflow prepare` as a user runs it on files in the public datasets' own layouts, with `format: auto`
and no column map: each source loads and the report names the layout that read it. A source that
yields nothing fails `prepare` and `run` with one line (no traceback), and its report and set-aside rows
are in the run folder."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

PIPELINES = """
pipelines:
  public:
    cpu_threads: 1
    model: {source: builtin:tiny-llama}
    data:
      sources: [uf_raw.jsonl, uf_binarized.jsonl, hh.jsonl, orca.jsonl, pku.jsonl, shp.jsonl]
      heldout_fraction: 0.2
    dpo: {max_length: 256}
  alpaca:
    cpu_threads: 1
    model: {source: builtin:tiny-llama}
    data:
      sources: [hh.jsonl, alpaca.jsonl]
      heldout_fraction: 0.2
    sft: {enabled: false}
    dpo: {max_length: 256}
"""


def msg(role, content):
    return {"role": role, "content": content}


def layouts(i: int) -> dict[str, dict]:
    """Row i of each file, with the fields (and the extra columns) its dataset card documents."""
    conv = [msg("user", f"Say hi {i}.")]
    return {
        "uf_raw.jsonl": {"source": "flan", "instruction": f"Name prime {i}.", "models": ["a", "b", "c"],
                         "correct_answers": [], "incorrect_answers": [],
                         "completions": [{"model": m, "response": r, "overall_score": s, "fine-grained_score": s and s / 2,
                                          "annotations": {}, "critique": "", "custom_system_prompt": ""}
                                         for m, r, s in (("a", "Two.", 8.0), ("b", "Four.", 3.0),
                                                         ("c", "Nine.", None))]},
        "uf_binarized.jsonl": {"prompt": f"Say hi {i}.", "prompt_id": str(i), "messages": [],
                               "chosen": conv + [msg("assistant", "Hi!")], "rejected": conv + [msg("assistant", "No.")],
                               "score_chosen": 8.0, "score_rejected": 4.0},
        "hh.jsonl": {"chosen": f"\n\nHuman: Joke {i}?\n\nAssistant: A pun.",
                     "rejected": f"\n\nHuman: Joke {i}?\n\nAssistant: Go away."},
        "orca.jsonl": {"system": "You are an AI assistant.", "question": f"Add {i} and 2.", "chosen": str(i + 2),
                       "rejected": "unsure"},
        "pku.jsonl": {"prompt": f"Harmful {i}?", "response_0": "I can't help.", "response_1": "Sure, here is how.",
                      "is_response_0_safe": True, "is_response_1_safe": False, "better_response_id": 1,
                      "safer_response_id": 0},
        "shp.jsonl": {"post_id": str(i), "domain": "askscience_train", "history": f"Why is the sky {i}?",
                      "human_ref_A": "Rayleigh scattering.", "human_ref_B": "Because.", "labels": 1,
                      "score_A": 30, "score_B": 2, "upvote_ratio": 0.9},
        "alpaca.jsonl": {"instruction": f"Do {i}.", "chosen": "done", "rejected": "no"},
    }


def dpoflow(tmp_path, *args):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, "-m", "dpoflow", *args, "-f", str(tmp_path / "pipelines.yaml"),
                           "--set", f"workdir={tmp_path / 'work'}"], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)


@pytest.fixture
def data(tmp_path):
    rows = [layouts(i) for i in range(20)]
    for name in rows[0]:
        (tmp_path / name).write_text("".join(json.dumps(r[name]) + "\n" for r in rows))
    (tmp_path / "pipelines.yaml").write_text(PIPELINES)
    return tmp_path


def test_public_layouts_load_with_format_auto(data):
    proc = dpoflow(data, "prepare", "public")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for name, layout in (("uf_raw", "ultrafeedback-raw"), ("uf_binarized", "ultrafeedback-binarized"),
                         ("hh", "implicit"), ("orca", "orca-dpo"), ("pku", "pku-saferlhf"), ("shp", "shp")):
        assert f"| {data / name}.jsonl | 20 | 20 | - | {layout} (auto) |" in proc.stdout, proc.stdout
    report = json.loads((data / "work" / "runs" / "public" / "latest" / "data_report.json").read_text())
    assert report["counts"]["train"] + report["counts"]["heldout"] == 120
    assert report["sources"][str(data / "uf_raw.jsonl")]["format"] == "ultrafeedback-raw (auto)"


def test_a_source_that_yields_nothing_fails_in_one_line_with_its_report_in_the_run_folder(data):
    alpaca = data / "alpaca.jsonl"
    expected = (f"dpoflow: {{}} failed: DataError: {alpaca}: nothing kept: 20 of 20 items set aside as "
                f"missing_field (first at {alpaca}:1: field 'prompt': missing; that row has fields chosen, "
                "instruction, rejected); rows have `instruction`, not `prompt`: set `data.columns.prompt: "
                "instruction` (data report: ")
    for command, what in (("prepare", "prepare of 'alpaca'"), ("run", "pipeline 'alpaca'")):
        proc = dpoflow(data, command, "alpaca")
        assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-5000:]
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
        [line] = [x for x in proc.stderr.splitlines() if x.startswith("dpoflow: ")]
        assert line.startswith(expected.format(what)), line
        run_dir = data / line.rsplit("(data report: ", 1)[1].removesuffix("/data_report.md)")
        report = json.loads((run_dir / "data_report.json").read_text())
        assert report["sources"][str(alpaca)]["rejected"] == {"missing_field": 20}
        assert report["sources"][str(data / "hh.jsonl")]["format"] == "implicit (auto)"
        assert "| missing_field 20 |" in (run_dir / "data_report.md").read_text()
        rejected = [json.loads(x) for x in (run_dir / "rejected.jsonl").read_text().splitlines()]
        assert [r["source"] for r in rejected] == [f"{alpaca}:{n}" for n in range(1, 21)]
