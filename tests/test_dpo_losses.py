"""Every DPO loss TRL computes is one `dpo.loss_type` accepts, and each trains: finite losses that
fall over a few steps of the tiny model on CPU. The list in the config is the installed TRL's."""

import inspect
import json
import math
import re
import typing

import pytest
import torch

from dpoflow.base.config import DPOSpec, LossName, TrainSetup, load_pipeline
from dpoflow.base.hardware import plan_stage
from dpoflow.tasks.dpo import train_dpo

TRL = TrainSetup(backend="trl")
LOSSES = typing.get_args(LossName)
SMOOTHING = {"robust": 0.1, "exo_pair": 1e-3}


def test_the_config_takes_exactly_the_losses_the_installed_trl_computes():
    from trl import DPOTrainer

    computed = set(re.findall(r'loss_type == "(\w+)"', inspect.getsource(DPOTrainer)))
    assert computed == set(LOSSES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="float32 TRL on CPU")
@pytest.mark.parametrize("loss", LOSSES)
def test_each_loss_trains_the_tiny_model_with_finite_falling_losses(loss, yes_no_pairs, tmp_path):
    start, data, _ = yes_no_pairs
    spec = DPOSpec(learning_rate=3e-3, max_steps=10, per_device_batch_size=4, gradient_accumulation_steps=1,
                   logging_steps=1, lr_scheduler="constant", loss_type=[loss], label_smoothing=SMOOTHING.get(loss, 0))
    train_dpo(start, data, spec, TRL, plan_stage(TRL, spec, start.path), 0, tmp_path / "out")
    losses = [e["loss"] for e in json.loads((tmp_path / "out" / "log_history.json").read_text()) if "loss" in e]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-3:]) / 3 < losses[0], losses


def test_weighted_losses_combine(yes_no_pairs, tmp_path):
    start, data, _ = yes_no_pairs
    spec = DPOSpec(learning_rate=1e-2, max_steps=2, per_device_batch_size=4, gradient_accumulation_steps=1,
                   logging_steps=1, lr_scheduler="constant", loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    train_dpo(start, data, spec, TRL, plan_stage(TRL, spec, start.path), 0, tmp_path / "out")
    first = json.loads((tmp_path / "out" / "log_history.json").read_text())[0]
    # Step 1: the policy is the reference, so the sigmoid term is ln 2; the rest is half the chosen NLL.
    assert first["loss"] > math.log(2) + 0.5


@pytest.mark.parametrize("dpo, error", [
    ("{loss_type: [dpo_plus]}", "dpo.loss_type.0: Input should be 'sigmoid', 'hinge', 'ipo', 'exo_pair'"),
    ("{loss_type: [exo_pair]}", "dpo: Value error, loss_type exo_pair needs label_smoothing > 0 (EXO's epsilon"),
    ("{loss_type: [robust]}", "dpo: Value error, loss_type robust needs label_smoothing > 0 (the probability"),
    ("{loss_type: [sigmoid, sft], loss_weights: [1.0]}", "loss_weights has 1 entries for 2 loss_type entries"),
    ("{label_smoothing: 0.5}", "dpo.label_smoothing: Input should be less than 0.5"),
])
def test_a_loss_the_config_cannot_train_is_one_line_naming_the_field(dpo, error, tmp_path, repo):
    from dpoflow.base.config import ConfigError

    file = tmp_path / "pipelines.yaml"
    file.write_text(f"pipelines:\n  p:\n    model: {{source: 'builtin:tiny-llama'}}\n"
                    f"    data: {{sources: ['{repo / 'data/demo/sentiment.jsonl'}']}}\n    dpo: {dpo}\n")
    with pytest.raises(ConfigError) as e:
        load_pipeline("p", file)
    assert error in str(e.value), str(e.value)
