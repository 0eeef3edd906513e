import json
import math

import torch

from dpoflow.artifacts import is_intact
from dpoflow.config import DPOSpec, TrainSetup
from dpoflow.models import load_model, load_tokenizer
from dpoflow.scoring import completion_logps
from dpoflow.tasks.dpo import train_dpo


def test_reference_is_the_start_model_with_the_adapter_off(tiny_model, tmp_path, yes_no_pairs):
    start, data, rows = yes_no_pairs
    spec = DPOSpec(learning_rate=1e-2, max_steps=3, per_device_batch_size=4, gradient_accumulation_steps=1,
                   logging_steps=1, lr_scheduler="constant")
    adapter = train_dpo(start, data, spec, TrainSetup(backend="trl"), "float32", 0, tmp_path / "out")
    assert is_intact(tmp_path / "out")
    log = json.loads((tmp_path / "out" / "log_history.json").read_text())
    # Step 1: policy == reference, so the sigmoid loss is exactly ln 2 and the margin 0.
    assert math.isclose(log[0]["loss"], math.log(2), abs_tol=1e-5)
    assert abs(log[0]["rewards/margins"]) < 1e-6

    from peft import PeftModel

    tok = load_tokenizer(str(tiny_model))
    prompts, chosen = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    base = completion_logps(load_model(str(tiny_model), "float32"), tok, prompts, chosen)
    tuned = PeftModel.from_pretrained(load_model(str(tiny_model), "float32"), adapter.path)
    with tuned.disable_adapter():
        reference = completion_logps(tuned, tok, prompts, chosen)
    assert torch.allclose(reference, base, atol=1e-5)
    assert not torch.allclose(completion_logps(tuned, tok, prompts, chosen), base, atol=1e-3)
    assert "base model" in adapter.reference and "[trl]" in adapter.reference
