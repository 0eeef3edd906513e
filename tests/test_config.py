import os
import subprocess
import sys
import textwrap

import pytest

from dpoflow.app.cli import main
from dpoflow.base.config import ConfigError, PipelineConfig, load_pipeline, parse_override, validate_file


def write(tmp_path, text: str):
    path = tmp_path / "pipelines.yaml"
    path.write_text(textwrap.dedent(text))
    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    return path


GOOD = """
    defaults:
      dpo:
        beta: 0.1
    pipelines:
      one:
        data:
          sources: [d.jsonl]
        dpo:
          learning_rate: 1.0e-3
    """


def test_seed_defaults_live_in_the_schema():
    config = PipelineConfig(name="x", data={"sources": ["a.jsonl"]})
    assert config.dpo.learning_rate == 5e-6
    assert config.dpo.beta == 0.1
    assert config.dpo.gradient_accumulation_steps == 8
    assert config.sft.learning_rate == 2e-4
    assert config.sft.enabled is False


def test_defaults_merge_and_paths_resolve_against_the_file(tmp_path):
    config = load_pipeline("one", write(tmp_path, GOOD))
    assert config.dpo.beta == 0.1 and config.dpo.learning_rate == 1e-3
    assert config.data.sources == [str(tmp_path / "d.jsonl")]
    assert config.workdir == str(tmp_path / ".dpoflow")


def test_overrides_are_typed_yaml_values(tmp_path):
    config = load_pipeline("one", write(tmp_path, GOOD), ["dpo.beta=0.25", "sft.enabled=true",
                                                          "export.formats=[adapter]"])
    assert config.dpo.beta == 0.25
    assert config.sft.enabled is True
    assert config.export.formats == ["adapter"]


def test_unknown_key_is_rejected_with_its_yaml_path_and_line(tmp_path):
    path = write(tmp_path, GOOD.replace("learning_rate: 1.0e-3", "learning_rate: 1.0e-3\n          betta: 0.3"))
    with pytest.raises(ConfigError) as err:
        load_pipeline("one", path)
    [problem] = err.value.problems
    assert f"{path}:11: pipelines.one.dpo.betta: Extra inputs are not permitted" == problem


def test_bad_value_names_field_and_line(tmp_path):
    path = write(tmp_path, GOOD.replace("learning_rate: 1.0e-3", "beta: -1"))
    with pytest.raises(ConfigError) as err:
        load_pipeline("one", path)
    assert err.value.problems[0].startswith(f"{path}:10: pipelines.one.dpo.beta: Input should be greater than 0")


def test_bad_override_is_blamed_on_the_override(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_pipeline("one", write(tmp_path, GOOD), ["dpo.beta=abc"])
    assert err.value.problems[0].startswith("--set dpo.beta: dpo.beta: Input should be a valid number")


def test_missing_required_field_is_reported(tmp_path):
    path = write(tmp_path, "pipelines:\n  empty: {}\n")
    with pytest.raises(ConfigError) as err:
        validate_file(path)
    assert "pipelines.empty.data: Field required" in err.value.problems[0]


def test_unknown_pipeline_and_top_level_key(tmp_path):
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match="no pipeline named 'two'.*defined: one"):
        load_pipeline("two", path)
    path.write_text(path.read_text() + "extra: 1\n")
    with pytest.raises(ConfigError, match="extra: unknown top-level key"):
        validate_file(path)


@pytest.mark.parametrize("item", ["nokey", "=3", "a.b=[unclosed"])
def test_malformed_override(item):
    with pytest.raises(ConfigError):
        parse_override(item)


def test_validate_command_exit_codes(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    assert main(["validate", "-f", str(path)]) == 0
    assert "ok: one" in capsys.readouterr().out
    path.write_text(path.read_text().replace("beta: 0.1", "beta: zero"))
    assert main(["validate", "-f", str(path)]) == 2
    err = capsys.readouterr().err
    assert "defaults.dpo.beta" in err or "pipelines.one.dpo.beta" in err


def test_repository_pipelines_file_is_valid(repo):
    names = [c.name for c in validate_file(repo / "pipelines.yaml")]
    assert "demo" in names


def test_sources_take_paths_globs_and_hub_datasets_with_mixing(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "b.parquet").write_bytes(b"")
    (tmp_path / "pipelines.yaml").write_text(
        "pipelines:\n  p:\n    data:\n      sources:\n        - a.jsonl\n"
        "        - {path: 'more/*.parquet', weight: 0.5}\n"
        "        - {hub: HuggingFaceH4/ultrafeedback_binarized, split: train_prefs, revision: main, count: 1000}\n")
    config = load_pipeline("p", tmp_path / "pipelines.yaml")
    plain, glob_, hub = config.data.source_specs
    assert plain.path == str(tmp_path / "a.jsonl") and glob_.path == str(tmp_path / "more/*.parquet")
    assert (hub.hub, hub.split, hub.revision, hub.count) == ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs",
                                                             "main", 1000)
    with pytest.raises(ValueError, match="exactly one of path or hub"):
        PipelineConfig(name="x", data={"sources": [{"split": "train"}]})
    with pytest.raises(ValueError, match="weight or count, not both"):
        PipelineConfig(name="x", data={"sources": [{"path": "a", "weight": 0.5, "count": 3}]})


def validate_cli(path, *args: str) -> subprocess.CompletedProcess:
    """`dpoflow validate` as a user runs it. The timeout bounds the work: a config error must be found
    in well under a second, and the unguarded cases took minutes and gigabytes."""
    return subprocess.run([sys.executable, "-m", "dpoflow", "validate", "-f", str(path), *args],
                          capture_output=True, text=True, timeout=20, env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_problem(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    head, *problems = proc.stderr.strip().splitlines()
    assert head == "invalid config:" and len(problems) == 1, proc.stderr
    return problems[0].strip()


def test_a_key_given_twice_names_both_lines(tmp_path):
    path = write(tmp_path, GOOD.replace("learning_rate: 1.0e-3", "learning_rate: 1.0e-3\n          beta: 0.2\n"
                                                                  "          learning_rate: 2.0e-3"))
    assert one_problem(validate_cli(path)) == (f"{path}:12: invalid YAML: key 'learning_rate' is given twice in one "
                                               "mapping (lines 10 and 12); YAML would keep only the last")
    # The same key in two mappings, and a merge key overriding what it merged, are not duplicates.
    write(tmp_path, GOOD.rstrip(" ") + "      two:\n        <<: {seed: 1}\n        seed: 2\n"
                           "        data: {sources: [d.jsonl]}\n        dpo: {beta: 0.3}\n")
    assert load_pipeline("two", path).seed == 2
    with pytest.raises(ConfigError, match="key 'beta' is given twice"):
        load_pipeline("one", path, ["dpo={beta: 0.1, beta: 0.2}"])


def test_a_file_that_is_not_utf8_names_the_line_and_byte(tmp_path):
    path = write(tmp_path, GOOD)
    path.write_bytes(path.read_bytes().replace(b"learning_rate: 1.0e-3", b"learning_rate: 1.0e-3  # caf\xe9"))
    problem = one_problem(validate_cli(path))
    offset = path.read_bytes().index(b"\xe9")
    assert problem == f"{path}:10: byte {offset} is not UTF-8 (invalid continuation byte); save the file as UTF-8"
    path.write_bytes(b"\xef\xbb\xbf" + textwrap.dedent(GOOD).encode())  # a BOM is fine
    assert load_pipeline("one", path).dpo.beta == 0.1


@pytest.mark.parametrize("yaml_text, why", [
    ("      job_variables: &a {env: *a}\n", "alias *a is inside the node it refers to (a recursive anchor)"),
    ("      job_variables: &a [1, *a]\n", "alias *a is inside the node it refers to (a recursive anchor)"),
    ("      job_variables:\n        l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
     + "".join(f"        l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)),
     "aliases expand to more than 10000 nodes (nested aliases; a config never needs that many)"),
])
def test_recursive_anchors_and_alias_bombs_are_one_line_errors(tmp_path, yaml_text, why):
    path = write(tmp_path, GOOD.rstrip(" ") + "        deploy:\n" + textwrap.indent(yaml_text, "    "))
    problem = one_problem(validate_cli(path))
    assert problem.startswith(f"{path}:") and problem.endswith(f": invalid YAML: {why}"), problem


def test_a_few_aliases_still_work(tmp_path):
    path = write(tmp_path, GOOD.rstrip(" ") + "      two:\n        data: &data {sources: [d.jsonl]}\n"
                                  "      three:\n        data: *data\n        dpo: {beta: 0.3}\n")
    assert [c.data.sources for c in validate_file(path)][1:] == [[str(tmp_path / "d.jsonl")]] * 2


def test_missing_local_data_files_and_model_folders_are_named_with_their_line(tmp_path):
    path = write(tmp_path, """
        pipelines:
          one:
            model: {source: ./models/mine}
            data:
              sources:
                - d.jsonl
                - gone.jsonl
                - {path: "more/*.parquet", weight: 0.5}
                - {hub: HuggingFaceH4/ultrafeedback_binarized, split: train_prefs}
                - {hub: ./saved_dataset}
          hub:
            model: {source: meta-llama/Llama-3.2-1B-Instruct}
            data: {sources: [d.jsonl]}
          builtin:
            model: {source: builtin:tiny-llama}
            data: {sources: ["*.jsonl"]}
        """)
    proc = validate_cli(path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[1:] == [
        f"  {path}:8: pipelines.one.data.sources.1: {tmp_path}/gone.jsonl: data file not found",
        f"  {path}:9: pipelines.one.data.sources.2: {tmp_path}/more/*.parquet: no file matches this pattern",
        f"  {path}:11: pipelines.one.data.sources.4: {tmp_path}/saved_dataset: local dataset folder not found",
        f"  {path}:4: pipelines.one.model.source: {tmp_path}/models/mine: local model folder not found",
    ]
    # Each is checked when a command loads the pipeline, not only by validate; an override is blamed.
    with pytest.raises(ConfigError) as err:
        load_pipeline("hub", path, [f"data.sources=[{tmp_path}/nope.jsonl]"])
    assert err.value.problems == [f"--set data.sources: data.sources.0: {tmp_path}/nope.jsonl: data file not found"]
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "gone.jsonl").write_text("{}\n")
    (tmp_path / "saved_dataset").mkdir()
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "x.parquet").write_bytes(b"")
    assert [c.name for c in validate_file(path)] == ["one", "hub", "builtin"]
