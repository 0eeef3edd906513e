"""The reference-free objectives of the dpo stage (`dpo.method: orpo | simpo`): each trains the tiny
model on CPU through TRL's own trainer to finite, falling losses, computes its own loss (checked at step
1 against the formula), writes what the later stages read, resumes from a checkpoint; the config refuses
what the method does not read, in one line naming the field."""

import json
import math

import pytest
import torch

from dpoflow.base.config import ConfigError, DPOSpec, GuardSpec, TrainSetup, load_pipeline
from dpoflow.base.hardware import plan_stage
from dpoflow.engine.objectives import objective_args, trainer_classes
from dpoflow.tasks.dpo import _trainer_class, train_dpo

TRL = TrainSetup(backend="trl")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="float32 TRL on CPU")
METHODS = ["orpo", "simpo"]


def _spec(method: str, **more) -> DPOSpec:
    return DPOSpec(method=method, learning_rate=3e-3, max_steps=10, per_device_batch_size=4,
                   gradient_accumulation_steps=1, logging_steps=1, lr_scheduler="constant", **more)


def _losses(folder) -> list[dict]:
    return [e for e in json.loads((folder / "log_history.json").read_text()) if "loss" in e]


def _step_one_loss(method: str, spec: DPOSpec, first: dict) -> float:
    """The method's loss from the log-probs TRL logged at step 1 (per-token means for both methods)."""
    def log_sigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x))

    if method == "orpo":  # NLL of the chosen sequence minus lambda * log sigmoid(log odds ratio)
        return first["nll_loss"] - spec.beta * first["log_odds_ratio"]
    gamma = 0.5 if spec.simpo_gamma is None else spec.simpo_gamma  # SimPO, no behaviour-cloning term
    return -log_sigmoid(spec.beta * (first["logps/chosen"] - first["logps/rejected"]) - gamma)


@cpu_only
@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_the_tiny_model_with_its_own_loss(method, yes_no_pairs, tmp_path):
    start, data, _ = yes_no_pairs
    spec = _spec(method, **({"simpo_gamma": 0.3, "beta": 2.0} if method == "simpo" else {}))
    adapter = train_dpo(start, data, spec, TRL, plan_stage(TRL, spec, start.path), 0, tmp_path / "out")

    logged = _losses(tmp_path / "out")
    losses = [e["loss"] for e in logged]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-3:]) / 3 < losses[0], losses
    # SimPO's loss is a mean over pairs of a curve of each pair's margin, the log a mean of the margins:
    # equal up to the spread of the margins, which these near-identical pairs keep small.
    assert logged[0]["loss"] == pytest.approx(_step_one_loss(method, spec, logged[0]), abs=2e-3)
    if method == "simpo":
        assert logged[0]["nll_loss"] == 0  # cpo_alpha 0: SimPO, not CPO
    # What evaluate, export and the summary read, as DPO writes it.
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    metrics = json.loads((tmp_path / "out" / "dpo_metrics.json").read_text())
    assert metrics["rewards/accuracies"] == 1.0 and metrics["rewards/margins"] > 0
    assert adapter.metrics == metrics
    assert adapter.reference.startswith(f"none: {method} is reference-free")
    if method == "orpo":
        assert {"nll_loss", "log_odds_ratio"} <= set(metrics)


@cpu_only
@pytest.mark.parametrize("method", METHODS)
def test_a_method_resumes_from_its_checkpoint_to_the_weights_of_an_uninterrupted_run(method, yes_no_pairs,
                                                                                     tmp_path):
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 7:
                raise RuntimeError("crash")

    start, data, _ = yes_no_pairs
    spec = _spec(method, guards=GuardSpec(checkpoint_steps=2))
    plan = plan_stage(TRL, spec, start.path)
    train_dpo(start, data, spec, TRL, plan, 0, tmp_path / "whole", tmp_path / "whole-ckpt")
    with pytest.raises(RuntimeError, match="crash"):
        train_dpo(start, data, spec, TRL, plan, 0, tmp_path / "out", tmp_path / "ckpt", callbacks=(Crash(),))
    train_dpo(start, data, spec, TRL, plan, 0, tmp_path / "out", tmp_path / "ckpt")

    assert [e["step"] for e in _losses(tmp_path / "out")] == list(range(1, 11))
    trained, expected = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("out", "whole"))
    assert trained.keys() == expected.keys()
    assert all((trained[k] - expected[k]).abs().max().item() < 1e-6 for k in expected)
    assert any(w.abs().max().item() > 0 for k, w in expected.items() if "lora_B" in k)


def test_each_method_gets_trl_s_trainer_for_it():
    from trl import DPOTrainer
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    assert issubclass(_trainer_class("dpo"), DPOTrainer)
    assert issubclass(_trainer_class("orpo"), ORPOTrainer)
    assert issubclass(_trainer_class("simpo"), CPOTrainer)
    assert trainer_classes("simpo")[1].__name__ == "CPOConfig"


def test_simpo_is_cpo_with_the_simpo_loss_and_no_behaviour_cloning_term():
    assert objective_args(DPOSpec(method="simpo", beta=2.0)) == dict(beta=2.0, loss_type="simpo", cpo_alpha=0.0,
                                                                       simpo_gamma=0.5)
    assert objective_args(DPOSpec(method="simpo", simpo_gamma=1.2))["simpo_gamma"] == 1.2
    assert objective_args(DPOSpec(method="orpo", beta=0.25)) == {"beta": 0.25}
    assert objective_args(DPOSpec())["loss_type"] == ["sigmoid"]


def _load(tmp_path, repo, dpo: str, more: str = "", overrides=()):
    file = tmp_path / "pipelines.yaml"
    file.write_text(f"pipelines:\n  p:\n    model: {{source: 'builtin:tiny-llama'}}\n"
                    f"    data: {{sources: ['{repo / 'data/demo/sentiment.jsonl'}']}}\n    dpo: {dpo}\n{more}")
    return load_pipeline("p", file, list(overrides))


@pytest.mark.parametrize("dpo, error", [
    ("{method: ipo}", ":5: pipelines.p.dpo.method: Input should be 'dpo', 'orpo', 'simpo' or 'kto'"),
    ("{method: orpo, precompute_ref_log_probs: true}",
     "pipelines.p.dpo.precompute_ref_log_probs: Value error, precompute_ref_log_probs is DPO only (the reference "
     "pass; there is no reference model); method orpo does not read it"),
    ("{method: simpo, loss_type: [ipo]}", "pipelines.p.dpo.loss_type: Value error, loss_type is DPO only"),
    ("{method: orpo, loss_weights: [1.0]}", "pipelines.p.dpo.loss_weights: Value error, loss_weights is DPO only"),
    ("{method: simpo, label_smoothing: 0.1}", "pipelines.p.dpo.label_smoothing: Value error, label_smoothing is DPO"),
    ("{simpo_gamma: 0.5}", "pipelines.p.dpo.simpo_gamma: Value error, simpo_gamma is SimPO only (SimPO's target "
                           "margin); method dpo does not read it: remove it or set dpo.method: simpo"),
    ("{method: orpo, simpo_gamma: 0.5}", "simpo_gamma is SimPO only (SimPO's target margin); method orpo does "
                                         "not read it"),
    ("{method: simpo, simpo_gamma: -1}", "pipelines.p.dpo.simpo_gamma: Input should be greater than or equal to 0"),
])
def test_what_a_method_does_not_read_is_refused_in_one_line_naming_the_field(dpo, error, tmp_path, repo):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, repo, dpo)
    assert len(e.value.problems) == 1 and "\n" not in e.value.problems[0]
    assert error in e.value.problems[0], e.value.problems[0]


def test_a_set_method_that_clashes_with_the_file_names_the_file_s_line(tmp_path, repo):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, repo, "{precompute_ref_log_probs: true}", overrides=["dpo.method=simpo"])
    assert e.value.problems == [f"{tmp_path / 'pipelines.yaml'}:5: pipelines.p.dpo.precompute_ref_log_probs: Value "
                                "error, precompute_ref_log_probs is DPO only (the reference pass; there is no "
                                "reference model); method simpo does not read it: remove it or set dpo.method: dpo"]


def test_the_dpo_only_defaults_are_accepted_with_any_method(tmp_path, repo):
    config = _load(tmp_path, repo, "{method: simpo, loss_type: [sigmoid], precompute_ref_log_probs: false, "
                                   "label_smoothing: 0, beta: 2.5, simpo_gamma: 1.0}")
    assert config.dpo.method == "simpo" and config.dpo.reference_free and config.dpo.reward_beta == 1.0
    assert _load(tmp_path, repo, "{beta: 0.3}").dpo.reward_beta == 0.3


@pytest.mark.parametrize("method, runs_sft", [("dpo", True), ("orpo", False), ("simpo", True)])
def test_orpo_skips_sft_and_says_why(method, runs_sft, tmp_path, repo):
    config = _load(tmp_path, repo, f"{{method: {method}}}", "    sft: {enabled: true}\n")
    assert config.runs_sft is runs_sft
    assert (config.sft_skipped is None) is runs_sft
    if not runs_sft:
        assert "orpo trains the SFT loss on the chosen answers in its own step" in config.sft_skipped
    assert not _load(tmp_path, repo, f"{{method: {method}}}").runs_sft  # sft.enabled false: nothing to skip
