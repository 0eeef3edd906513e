"""KTO (`dpo.method: kto`) as a user meets it: it trains the tiny model on CPU through TRL's KTOTrainer,
on unpaired thumbs-up/down examples and on pairs split into two, with the start model (adapter off) as
the reference; the config refuses its knobs with other methods and theirs with it, in one line."""

import json
import math

import pytest
import torch

from dpoflow.base.config import ConfigError, DPOSpec, TrainSetup, load_pipeline
from dpoflow.base.hardware import plan_stage
from dpoflow.engine.objectives import objective_args
from dpoflow.engine.pairs import DataError
from dpoflow.tasks.dpo import _kto_rows, _trainer_class, train_dpo

TRL = TrainSetup(backend="trl")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="float32 TRL on CPU")


def _spec(**more) -> DPOSpec:
    return DPOSpec(method="kto", learning_rate=3e-3, max_steps=10, per_device_batch_size=4,
                   gradient_accumulation_steps=1, logging_steps=1, lr_scheduler="constant", **more)


@pytest.fixture
def feedback(yes_no_pairs, tmp_path):
    """The yes/no questions as unpaired feedback only: "yes" liked on even questions, "no" disliked on odd ones."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    start, data, rows = yes_no_pairs
    unpaired = [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 == 0 else r["rejected"],
                 "label": i % 2 == 0, "source": f"f:{i}"} for i, r in enumerate(rows)]
    pq.write_table(pa.Table.from_pylist(unpaired), tmp_path / "train_unpaired.parquet")
    pq.write_table(pa.Table.from_pylist([], schema=pa.schema([(c, pa.string()) for c in
                                                              ("prompt", "chosen", "rejected", "source")])),
                   tmp_path / "train.parquet")
    counts = {"train": len(unpaired), "train_unpaired": len(unpaired)}
    return start, data.model_copy(update={"train": str(tmp_path / "train.parquet"), "counts": counts,
                                          "train_unpaired": str(tmp_path / "train_unpaired.parquet")})


@cpu_only
@pytest.mark.parametrize("shape", ["unpaired", "pairs"])
def test_kto_trains_the_tiny_model_ten_steps_with_a_finite_falling_loss(shape, feedback, yes_no_pairs, tmp_path):
    start, data = feedback if shape == "unpaired" else yes_no_pairs[:2]
    adapter = train_dpo(start, data, _spec(), TRL, plan_stage(TRL, _spec(), start.path), 0, tmp_path / "out")

    logged = [e for e in json.loads((tmp_path / "out" / "log_history.json").read_text()) if "loss" in e]
    losses = [e["loss"] for e in logged]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-3:]) / 3 < losses[0], losses
    # At step 1 the policy is the reference (a fresh adapter): every reward is exactly 0, the loss 1 - sigmoid(0).
    assert logged[0]["loss"] == pytest.approx(0.5, abs=1e-4)
    assert logged[0]["rewards/chosen"] == 0 and logged[0]["kl"] == 0
    metrics = adapter.metrics
    assert metrics["rewards/margins"] > 0 and math.isfinite(metrics["kl"])
    liked = 8 if shape == "unpaired" else 16  # pairs: one desirable and one undesirable example each
    assert (metrics["kto/desirable"], metrics["kto/undesirable"]) == (liked, liked)
    assert adapter.reference.endswith("with the DPO adapter disabled [trl; computed on the fly from it]")
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_pairs_become_one_desirable_and_one_undesirable_example_in_mixed_order(yes_no_pairs):
    _, data, rows = yes_no_pairs
    examples = _kto_rows(data, seed=0)
    assert len(examples) == 2 * len(rows) and sum(examples["label"]) == len(rows)
    assert sorted((e["completion"], e["label"]) for e in examples)[:2] == [("no<|end|>", False)] * 2
    assert examples["label"][:4] != [True, False, True, False]  # shuffled: TRL's KTO reads in order
    assert _kto_rows(data, seed=0)["prompt"] == examples["prompt"]  # seeded


def test_other_methods_refuse_data_that_is_all_unpaired_in_one_line(feedback, tmp_path):
    start, data = feedback
    spec = DPOSpec(max_steps=1, per_device_batch_size=4)
    with pytest.raises(DataError) as e:
        train_dpo(start, data, spec, TRL, plan_stage(TRL, spec, start.path), 0, tmp_path / "out")
    assert str(e.value) == ("dpo.method dpo trains on preference pairs, and the prepared data has none: its 16 train "
                            "examples are unpaired (prompt/completion/label). Set dpo.method: kto, or give pairs "
                            "(prompt/chosen/rejected)")


def test_kto_is_trl_s_trainer_with_its_weights():
    from trl import KTOTrainer

    assert issubclass(_trainer_class("kto"), KTOTrainer)
    assert objective_args(DPOSpec(method="kto", beta=0.2, desirable_weight=1.3)) == dict(
        beta=0.2, loss_type="kto", desirable_weight=1.3, undesirable_weight=1.0)


def _load(tmp_path, repo, dpo: str):
    file = tmp_path / "pipelines.yaml"
    file.write_text(f"pipelines:\n  p:\n    model: {{source: 'builtin:tiny-llama'}}\n"
                    f"    data: {{sources: ['{repo / 'data/demo/feedback.jsonl'}']}}\n    dpo: {dpo}\n")
    return load_pipeline("p", file)


@pytest.mark.parametrize("dpo, error", [
    ("{desirable_weight: 1.5}", ":5: pipelines.p.dpo.desirable_weight: Value error, desirable_weight is KTO only "
                                "(weighs KTO's loss on desirable examples); method dpo does not read it: remove it "
                                "or set dpo.method: kto"),
    ("{method: simpo, undesirable_weight: 2}", "undesirable_weight is KTO only (weighs KTO's loss on undesirable "
                                               "examples); method simpo does not read it"),
    ("{method: kto, loss_type: [ipo]}", "pipelines.p.dpo.loss_type: Value error, loss_type is DPO only"),
    ("{method: kto, simpo_gamma: 0.5}", "simpo_gamma is SimPO only (SimPO's target margin); method kto does not "
                                        "read it"),
    ("{method: kto, precompute_ref_log_probs: true}", "precompute_ref_log_probs is DPO only"),
    ("{method: kto, desirable_weight: 0}", "pipelines.p.dpo.desirable_weight: Input should be greater than 0"),
    ("{method: kto, per_device_batch_size: 1}", "pipelines.p.dpo: Value error, kto estimates its KL term from the "
                                                "other examples of a micro-batch: per_device_batch_size must be at "
                                                "least 2"),
])
def test_what_kto_does_not_read_and_its_knobs_elsewhere_are_refused_in_one_line(dpo, error, tmp_path, repo):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, repo, dpo)
    assert len(e.value.problems) == 1 and "\n" not in e.value.problems[0]
    assert error in e.value.problems[0], e.value.problems[0]


def test_kto_and_its_weights_are_accepted_and_keep_the_reference(tmp_path, repo):
    config = _load(tmp_path, repo, "{method: kto, beta: 0.2, desirable_weight: 1.33, undesirable_weight: 1.0}")
    assert config.dpo.method == "kto" and not config.dpo.reference_free and config.dpo.reward_beta == 0.2
    assert config.runs_sft is False and config.sft_skipped is None


def test_the_sweep_table_names_kto_and_what_its_columns_mean_for_it():
    from dpoflow.base.sweeps import comparison_markdown

    rows = [{"variant": "dpo.method=dpo", "method": "dpo", "heldout_accuracy": 1.0},
            {"variant": "dpo.method=kto", "method": "kto", "train_reward_accuracy": None, "heldout_accuracy": None}]
    table = comparison_markdown("demo", rows)
    assert "| dpo.method=kto | kto | - | - | - |" in table
    assert "kto: TRL's KTO logs no train reward accuracy; with unpaired held-out data there is no held-out pair " \
           "accuracy" in table
