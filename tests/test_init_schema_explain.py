import json
import textwrap

import jsonschema
import pytest
import yaml

from dpoflow.app.cli import main
from dpoflow.base.config import load_pipeline, validate_file
from dpoflow.app.schema import SCHEMA_PATH, pipelines_schema, schema_text
from dpoflow.app.wizard import insert_entry

EXISTING = textwrap.dedent("""\
    # my pipelines (this comment must survive)
    defaults:
      seed: 7   # and this one

    pipelines:
        old:   # four-space entries
            data: {sources: [pairs.jsonl]}

    # trailing comment
    """)


@pytest.fixture
def project(tmp_path):
    rows = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}", "rejected": f"Bad {i}"} for i in range(5)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "pipelines.yaml").write_text(EXISTING)
    return tmp_path


def test_committed_schema_is_in_sync_with_the_config_schema():
    assert SCHEMA_PATH.read_text() == schema_text(), "run: dpoflow schema --write"


def test_schema_accepts_the_repository_file_and_flags_unknown_keys(repo):
    doc = yaml.safe_load((repo / "pipelines.yaml").read_text())
    jsonschema.validate(doc, pipelines_schema())
    doc["pipelines"]["demo"]["dpo"]["betta"] = 0.1
    with pytest.raises(jsonschema.ValidationError, match="betta"):
        jsonschema.validate(doc, pipelines_schema())
    assert (repo / "pipelines.yaml").read_text().startswith(
        "# yaml-language-server: $schema=schema/pipelines.schema.json")


def test_init_with_flags_keeps_the_rest_of_the_file_and_validates(project, capsys):
    file = project / "pipelines.yaml"
    code = main(["init", "fresh", "-f", str(file), "--model", "builtin:tiny-llama", "--data", "pairs.jsonl",
                 "--sft", "--hardware", "gpu-small", "--export", "adapter", "--yes"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "first 3 pairs" in out and "Good answer 0" in out
    text = file.read_text()
    original = [line for line in EXISTING.splitlines() if line.strip()]
    assert [line for line in text.splitlines() if line in original] == original  # every line, in order
    assert text.index("fresh:") < text.index("# trailing comment")
    config = load_pipeline("fresh", file)
    assert config.sft.enabled and config.train.quantize == "4bit" and config.export.formats == ["adapter"]
    assert config.dpo.learning_rate == 5e-6 and config.dpo.beta == 0.1 and config.sft.learning_rate == 2e-4
    assert config.seed == 7  # defaults still apply
    assert "    fresh:" in text  # the file's own indentation
    assert [c.name for c in validate_file(file)] == ["old", "fresh"]
    # round trip: the written entry reads back to the same config when rewritten from it
    entry = yaml.safe_load(text)["pipelines"]["fresh"]
    assert entry["dpo"]["gradient_accumulation_steps"] == 8


def test_init_through_its_prompts(project, monkeypatch, capsys):
    answers = iter(["prompted", "builtin:tiny-llama", "pairs.jsonl", "n", "cpu", "", "my-org/prompted-dpo"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    assert main(["init", "-f", str(project / "pipelines.yaml")]) == 0
    config = load_pipeline("prompted", project / "pipelines.yaml")
    assert not config.sft.enabled and config.train.quantize == "none"
    assert config.export.formats == ["adapter", "merged"]
    assert config.publish.enabled and config.publish.repo_id == "my-org/prompted-dpo" and config.publish.private


def test_init_without_a_hub_repo_writes_no_publish_section(project):
    assert main(["init", "local", "-f", str(project / "pipelines.yaml"), "--model", "m", "--data", "pairs.jsonl",
                 "--export", "adapter,gguf", "--yes"]) == 0
    config = load_pipeline("local", project / "pipelines.yaml")
    assert not config.publish.enabled and config.export.formats == ["adapter", "gguf"]
    assert main(["init", "bad", "-f", str(project / "pipelines.yaml"), "--model", "m", "--data", "pairs.jsonl",
                 "--hub-repo", "no-owner", "--yes"]) == 2


def test_init_refuses_bad_data_and_duplicates_without_touching_the_file(project, capsys):
    file = project / "pipelines.yaml"
    (project / "bad.jsonl").write_text('{"prompt": "p", "chosen": "a"}\n')
    assert main(["init", "x", "-f", str(file), "--model", "m", "--data", "bad.jsonl", "--yes"]) == 2
    assert "bad.jsonl:1: field 'rejected': missing" in capsys.readouterr().err
    assert main(["init", "old", "-f", str(file), "--model", "m", "--data", "pairs.jsonl", "--yes"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert file.read_text() == EXISTING


def test_insert_entry_creates_the_block_when_missing():
    assert insert_entry("defaults: {}\n", "a", "  a:\n    x: 1\n") == "defaults: {}\npipelines:\n  a:\n    x: 1\n"


def test_explain_on_an_empty_workdir_says_everything_runs(repo, tmp_path, capsys):
    assert main(["explain", "demo", "-f", str(repo / "pipelines.yaml"), "--set", f"workdir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "model     runs    no earlier run of this pipeline to reuse" in out
    assert "dpo       runs    after sft, prepare, whose output will be new" in out
    assert "hardware plan for dpo:" in out and "precision:          fp32" in out
    assert "learning_rate: 0.001" in out  # the resolved config
    assert not any(tmp_path.iterdir())  # nothing ran, nothing was written
