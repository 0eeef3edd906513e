"""Answers from a model to a list of prompts: batched, left-padded, on the GPU when there is one, with
fixed generation settings and seed, so the same model and settings give the same answers. Plain
functions; torch is imported where used."""

from __future__ import annotations

from dataclasses import dataclass

SENTINEL = "\x00dpoflow-question\x00"


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    seed: int
    batch_size: int


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def render_question(tokenizer, question: str) -> str:
    """A plain question as the model's prompt: one user turn through its chat template."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)


def plain_question(tokenizer, prompt: str) -> str:
    """The user's text inside a prompt rendered by `tokenizer`'s chat template (what prepare stores), for
    judges that read plain text. The template is rendered around a sentinel to find what it adds before
    and after a single user turn; a prompt that is not of that shape (a system prompt, several turns) is
    given whole, with the special tokens' text left in."""
    try:
        shell = render_question(tokenizer, SENTINEL)
    except Exception:  # noqa: BLE001 - a template that cannot render a single turn: give the prompt as is
        return prompt
    before, _, after = shell.partition(SENTINEL)
    if prompt.startswith(before) and prompt.endswith(after) and len(prompt) >= len(before) + len(after):
        return prompt[len(before):len(prompt) - len(after)]
    return prompt


def generate(model, tokenizer, prompts: list[str], settings: GenerationSettings) -> list[dict]:
    """{"answer": text (special tokens dropped), "tokens": tokens generated before the end-of-sequence
    token} for each rendered prompt, in order. Prompts are batched by length, so padding stays small."""
    import torch

    dev = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    eos_ids.add(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[dict | None] = [None] * len(prompts)
    model.eval()
    for b, start in enumerate(range(0, len(order), settings.batch_size)):
        rows = order[start:start + settings.batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):  # left padding: every prompt ends where generation starts
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]):] = 1
        sample = settings.temperature > 0
        torch.manual_seed(settings.seed + b)
        with torch.no_grad():
            generated = model.generate(
                input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=settings.max_new_tokens,
                do_sample=sample, temperature=settings.temperature if sample else None,
                top_p=settings.top_p if sample else None, top_k=None, pad_token_id=pad,
                eos_token_id=sorted(i for i in eos_ids if i is not None))
        for r, i in enumerate(rows):
            new = generated[r, width:].tolist()
            end = next((k for k, t in enumerate(new) if t in eos_ids), len(new))
            out[i] = {"answer": tokenizer.decode(new[:end], skip_special_tokens=True).strip(), "tokens": end}
    return out  # type: ignore[return-value]
