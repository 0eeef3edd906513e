import textwrap

import pytest

from dpoflow.cli import main
from dpoflow.config import ConfigError, PipelineConfig, load_pipeline, parse_override, validate_file


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
