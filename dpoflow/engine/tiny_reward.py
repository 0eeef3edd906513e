"""`builtin:tiny-reward`: a small reward model built in code, for the demo and the tests, where no real
reward model can be downloaded. A ~0.2M-parameter Llama sequence classifier with a tokenizer of its own
(a byte-level BPE trained on the pairs, unlike the policy's), trained for a few seconds with the
Bradley-Terry loss on the run's own training pairs (chosen above rejected, and above an empty answer).
It judges only what those pairs teach (on the demo data: the correct sentiment label), which is exactly
what the demo asks of it.
Deterministic: the same pairs on the same device give the same model. It trains where the judge runs (the
GPU when there is one): in a process that trained through Unsloth, Llama models built on the CPU fail
(its patched classes keep their rotary caches on cuda:0)."""

from __future__ import annotations

from pathlib import Path

NAME = "builtin:tiny-reward"
SHAPE = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
VOCAB_SIZE = 384
EPOCHS = 4
BATCH = 32
LEARNING_RATE = 3e-3
SEED = 0


def build_tiny_reward_model(pairs: list[tuple[str, str, str]], out_dir: Path, device: str = "cpu",
                            log=print) -> Path:
    """Train on (question, chosen, rejected) texts; save model and tokenizer into `out_dir`."""
    import random

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    if not pairs:
        raise ValueError(f"{NAME}: no training pairs to learn from")
    # Generated answers can be empty (a weak model that only emits whitespace): teach that any answer the
    # pairs prefer beats no answer, or the model scores an input it never saw at random.
    pairs = list(pairs) + [(q, c, "") for q, c, _ in pairs]
    texts = [text for q, c, r in pairs for text in (q, c, r)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<pad>", "<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                        model_max_length=512)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, **SHAPE)
    torch.manual_seed(SEED)
    model = LlamaForSequenceClassification(config).float().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    order = list(range(len(pairs)))
    rng = random.Random(SEED)

    def encode(texts):
        return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=256).to(device)

    model.train()
    for epoch in range(EPOCHS):
        rng.shuffle(order)
        correct = 0
        for i in range(0, len(order), BATCH):
            batch = [pairs[j] for j in order[i:i + BATCH]]
            enc = encode([f"{q}\n\n{c}" for q, c, _ in batch] + [f"{q}\n\n{r}" for q, _, r in batch])
            scores = model(**enc).logits[:, 0]
            chosen, rejected = scores[:len(batch)], scores[len(batch):]
            loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            correct += int((chosen > rejected).sum().item())
        log(f"{NAME}: epoch {epoch + 1}/{EPOCHS}, train pair accuracy {correct / len(pairs):.2f}")
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
