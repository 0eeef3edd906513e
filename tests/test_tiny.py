from dpoflow.base.artifacts import folder_digest
from dpoflow.engine.models import load_model, load_tokenizer
from dpoflow.engine.tiny import build_tiny_model


def test_builtin_model_is_deterministic(tmp_path, tiny_model):
    again = build_tiny_model("tiny-llama", tmp_path / "again")
    assert folder_digest(again) == folder_digest(tiny_model)


def test_tokenizer_has_chat_template_and_splits_prompt_on_a_token_boundary(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt == "<|begin|><|user|>\nHi there<|end|>\n<|assistant|>\n"
    ids = tok(prompt)["input_ids"]
    full = tok(prompt + "positive" + tok.eos_token)["input_ids"]
    assert full[:len(ids)] == ids and full[-1] == tok.eos_token_id
    assert tok.decode(full, skip_special_tokens=True).endswith("positive")


def test_model_loads_and_has_expected_size(tiny_model):
    model = load_model(str(tiny_model), "float32")
    n = sum(p.numel() for p in model.parameters())
    assert 300_000 < n < 1_000_000
    assert model.config.hidden_size == 128
