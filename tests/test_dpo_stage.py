import json
import math

import pytest
import torch

from dpoflow.base.artifacts import is_intact
from dpoflow.base.config import DPOSpec, TrainSetup
from dpoflow.base.hardware import plan_stage
from dpoflow.engine.models import load_model, load_tokenizer
from dpoflow.engine.scoring import completion_logps
from dpoflow.tasks.dpo import train_dpo

TRL = TrainSetup(backend="trl")
# These compare against float32 numbers on the CPU; on a GPU box TRL trains in bf16 (and once another test
# has imported Unsloth, it has patched TRL in that process).
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="float32 TRL on CPU")


@cpu_only
def test_reference_is_the_start_model_with_the_adapter_off(tiny_model, tmp_path, yes_no_pairs):
    start, data, rows = yes_no_pairs
    spec = DPOSpec(learning_rate=1e-2, max_steps=3, per_device_batch_size=4, gradient_accumulation_steps=1,
                   logging_steps=1, lr_scheduler="constant")
    adapter = train_dpo(start, data, spec, TRL, plan_stage(TRL, spec, start.path), 0, tmp_path / "out")
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
    assert "base model" in adapter.reference and "[trl;" in adapter.reference


@cpu_only
def test_precomputed_reference_is_trl_s_own_and_equals_the_start_model(tiny_model, tmp_path, yes_no_pairs):
    """The trainer's reference log-probs (TRL's computation, stored by the reference task) equal the
    log-probs of the intended model computed independently; training on them starts at ln 2."""
    from dpoflow.base.artifacts import read_jsonl_rows
    from dpoflow.tasks.dpo import compute_reference_logps

    start, data, rows = yes_no_pairs
    spec = DPOSpec(learning_rate=1e-3, max_steps=2, per_device_batch_size=4, gradient_accumulation_steps=1,
                   logging_steps=1, lr_scheduler="constant", precompute_ref_log_probs=True)
    reference = compute_reference_logps(start, data, spec, TRL, plan_stage(TRL, spec, start.path), 0,
                                        tmp_path / "ref")
    stored = read_jsonl_rows(reference.file)
    assert [r["row"] for r in stored] == list(range(len(rows)))

    tok, model = load_tokenizer(str(tiny_model)), load_model(str(tiny_model), "float32")
    prompts = [r["prompt"] for r in rows]
    for field in ("chosen", "rejected"):
        intended = completion_logps(model, tok, prompts, [r[field] for r in rows])
        assert torch.allclose(torch.tensor([r[f"ref_{field}_logps"] for r in stored]), intended, atol=1e-4)

    adapter = train_dpo(start, data, spec, TRL, plan_stage(TRL, spec, start.path), 0, tmp_path / "out",
                        reference=reference)
    log = json.loads((tmp_path / "out" / "log_history.json").read_text())
    assert math.isclose(log[0]["loss"], math.log(2), abs_tol=1e-5)
    assert "precomputed" in adapter.reference


@cpu_only
def test_dpo_trains_on_the_reference_pass_s_tokens_without_tokenizing_again(tmp_path, yes_no_pairs, monkeypatch):
    """A dpo stage that reuses a reference pass trains on the rows that pass tokenized (stored beside its
    log-probs) and does not tokenize again: same losses and adapter as tokenizing the text itself."""
    from safetensors.torch import load_file
    from trl import DPOTrainer

    from dpoflow.tasks.dpo import compute_reference_logps

    start, data, _ = yes_no_pairs
    spec = DPOSpec(learning_rate=1e-2, max_steps=3, per_device_batch_size=2, gradient_accumulation_steps=1,
                   logging_steps=1, lr_scheduler="constant", precompute_ref_log_probs=True)
    plan = plan_stage(TRL, spec, start.path)
    reference = compute_reference_logps(start, data, spec, TRL, plan, 0, tmp_path / "ref")
    assert reference.pairs and is_intact(tmp_path / "ref")

    tokenized = []
    prepare = DPOTrainer._prepare_dataset
    monkeypatch.setattr(DPOTrainer, "_prepare_dataset",
                        lambda self, *args: tokenized.append(args[-1]) or prepare(self, *args))
    train_dpo(start, data, spec, TRL, plan, 0, tmp_path / "stored", reference=reference)
    assert tokenized == []
    # A reference record from before the stored rows existed: the stage tokenizes the text itself.
    train_dpo(start, data, spec, TRL, plan, 0, tmp_path / "text", reference=reference.model_copy(update={"pairs": None}))
    assert tokenized == ["train"]

    logs = [json.loads((tmp_path / run / "log_history.json").read_text()) for run in ("stored", "text")]
    assert [e.get("loss") for e in logs[0]] == [e.get("loss") for e in logs[1]]
    weights = [load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("stored", "text")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], torch.zeros_like(weights[0][k])) for k in weights[0] if "lora_B" in k)


def test_loss_types_and_weights_are_validated():
    import pytest
    from pydantic import ValidationError

    spec = DPOSpec(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2])
    assert spec.loss_type == ["sigmoid", "sft"]
    with pytest.raises(ValidationError, match="loss_weights has 1 entries for 2 loss_type"):
        DPOSpec(loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValidationError):
        DPOSpec(loss_type=["made_up"])


def test_sigmoid_plus_sft_loss_trains(tmp_path, yes_no_pairs):
    start, data, _ = yes_no_pairs
    spec = DPOSpec(learning_rate=1e-3, max_steps=2, per_device_batch_size=4, gradient_accumulation_steps=1,
                   logging_steps=1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    train_dpo(start, data, spec, TRL, plan_stage(TRL, spec, start.path), 0, tmp_path / "out")
    log = json.loads((tmp_path / "out" / "log_history.json").read_text())
    # The sft term adds 0.5 * NLL of the chosen answer: well above the sigmoid loss's ln 2 at step 1.
    assert log[0]["loss"] > math.log(2) + 1.0


def test_the_stage_frees_its_model_before_returning(tmp_path, yes_no_pairs):
    """A later stage in the same process (a sweep's next variant, the evaluation) must not find this
    stage's model still alive: with automatic collection off, nothing but the stage can free it."""
    import gc

    from transformers import PreTrainedModel

    start, data, _ = yes_no_pairs
    spec = DPOSpec(max_steps=1, per_device_batch_size=4, gradient_accumulation_steps=1)

    def live_models():
        return sum(isinstance(o, PreTrainedModel) for o in gc.get_objects())

    gc.collect()
    before = live_models()
    gc.disable()
    try:
        train_dpo(start, data, spec, TRL, plan_stage(TRL, spec, start.path), 0, tmp_path / "out")
        assert live_models() == before
    finally:
        gc.enable()
