"""The built-in tiny model: a small random Llama and a byte-level BPE tokenizer, built in code.

It needs no network and is bit-for-bit the same on every build of the same library versions, so the
demo and the tests can run anywhere and its content hash is a stable cache key.
"""

from __future__ import annotations

from pathlib import Path

# A base model has no chat template of its own; this one marks roles with special tokens so prompts and
# completions split on token boundaries (TRL finds the completion by the common token prefix).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|begin|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# name -> LlamaConfig fields. `tiny-llama` (~0.5M parameters) learns the demo task in seconds on one CPU
# core (hidden 64 plateaued near 0.9 held-out accuracy with LoRA); `tiny-llama-256` has rows of 256 so
# llama.cpp's k-quants apply to it.
SHAPES: dict[str, dict] = {
    "tiny-llama": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2),
    "tiny-llama-256": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2),
}
VOCAB_SIZE = 1024
SEED = 0


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = (Path(__file__).resolve().parents[1] / "builtin" / "tiny_corpus.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    # GPT-2 style byte-level pre-tokenization: every string is encodable and llama.cpp's GGUF
    # converter recognizes the pre-tokenizer.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def build_tiny_model(shape: str, out_dir: Path) -> Path:
    """Write a random-weight Llama of `shape` and its tokenizer into `out_dir`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"unknown built-in model {shape!r}; choose one of {sorted(SHAPES)}")
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SHAPES[shape],
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
