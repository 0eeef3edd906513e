import torch

from dpoflow.engine.models import load_model, load_tokenizer
from dpoflow.engine.scoring import completion_logps


def test_batched_logps_equal_one_by_one_manual_sums(tiny_model):
    tok, model = load_tokenizer(str(tiny_model)), load_model(str(tiny_model), "float32")
    prompts = ["<|begin|><|user|>\nhello<|end|>\n<|assistant|>\n", "<|begin|><|user|>\na much longer question "
               "with many words<|end|>\n<|assistant|>\n"]
    completions = ["positive<|end|>", "no<|end|>"]
    batched = completion_logps(model, tok, prompts, completions, batch_size=2)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n, full = len(tok(p)["input_ids"]), tok(p + c)["input_ids"]
        with torch.no_grad():
            logps = model(torch.tensor([full])).logits[0].log_softmax(-1)
        manual = sum(logps[t - 1, full[t]].item() for t in range(n, len(full)))
        assert abs(batched[i].item() - manual) < 1e-4
