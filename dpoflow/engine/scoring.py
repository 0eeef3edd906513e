"""Log-probabilities of completions given prompts, tokenized the way TRL's DPOTrainer does it:
prompt and prompt+completion are tokenized separately and the completion starts where they diverge."""

from __future__ import annotations


def _pair_ids(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], int]:
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + completion)["input_ids"]
    start = 0
    for a, b in zip(prompt_ids, full_ids):
        if a != b:
            break
        start += 1
    return full_ids[:max_length], start


def completion_logps(model, tokenizer, prompts: list[str], completions: list[str],
                     max_length: int = 512, batch_size: int = 16):
    """Summed log p(completion | prompt) for each pair, as a float tensor."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    model.eval()
    for i in range(0, len(prompts), batch_size):
        pairs = [_pair_ids(tokenizer, p, c, max_length) for p, c in zip(prompts[i:i + batch_size],
                                                                      completions[i:i + batch_size])]
        width = max(len(ids) for ids, _ in pairs)
        input_ids = torch.full((len(pairs), width), pad, dtype=torch.long)
        attention = torch.zeros((len(pairs), width), dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.bool)
        for row, (ids, start) in enumerate(pairs):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention[row, :len(ids)] = 1
            mask[row, start:len(ids)] = True
        input_ids, attention, mask = input_ids.to(device), attention.to(device), mask.to(device)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
        logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        out.append((logps * mask[:, 1:]).sum(-1).cpu())
    return torch.cat(out)
