import pytest

from dpoflow.base.config import ConfigError
from dpoflow.base.sweeps import comparison_markdown, parse_vary, plan_sweep


def test_vary_values_are_a_yaml_sequence():
    assert parse_vary("dpo.beta=0.05,0.1") == ("dpo.beta", [0.05, 0.1])
    assert parse_vary("dpo.loss_type=[sigmoid],[sigmoid, sft]") == ("dpo.loss_type", [["sigmoid"], ["sigmoid", "sft"]])
    for bad, why in [("dpo.beta", "expected KEY.PATH=VALUE1"), ("dpo.beta=", "expected"),
                     ("dpo.beta=0.1,0.1", "given twice"), ("dpo.beta=[0.1", "not valid YAML")]:
        with pytest.raises(ConfigError, match=why):
            parse_vary(bad)


def test_every_combination_is_the_pipeline_with_its_set_items(repo):
    variants = plan_sweep("demo", ["dpo.beta=0.1,0.2", "dpo.learning_rate=1e-3,5e-4"], repo / "pipelines.yaml",
                          ["evaluate.limit=20"])
    assert [v.label for v in variants] == [
        "dpo.beta=0.1 dpo.learning_rate=0.001", "dpo.beta=0.1 dpo.learning_rate=0.0005",
        "dpo.beta=0.2 dpo.learning_rate=0.001", "dpo.beta=0.2 dpo.learning_rate=0.0005"]
    assert [(v.config.dpo.beta, v.config.dpo.learning_rate) for v in variants] == [
        (0.1, 1e-3), (0.1, 5e-4), (0.2, 1e-3), (0.2, 5e-4)]
    assert all(v.config.evaluate.limit == 20 for v in variants)
    assert variants[3].items == ["dpo.beta=0.2", "dpo.learning_rate=0.0005"]  # 5e-4: a number, not YAML 1.1's string


def test_bad_variants_are_all_named(repo):
    with pytest.raises(ConfigError) as e:
        plan_sweep("demo", ["dpo.beta=0.1,-1,-2"], repo / "pipelines.yaml")
    assert len(e.value.problems) == 2
    assert e.value.problems[0].startswith("variant dpo.beta=-1: ") and "dpo.beta" in e.value.problems[0]
    with pytest.raises(ConfigError, match="at least one --vary"):
        plan_sweep("demo", [], repo / "pipelines.yaml")
    with pytest.raises(ConfigError, match="dpo.beta is varied twice"):
        plan_sweep("demo", ["dpo.beta=0.1,0.2", "dpo.beta=0.3,0.4"], repo / "pipelines.yaml")


def test_a_sweep_does_not_publish(repo):
    with pytest.raises(ConfigError, match="every variant would push to me/model"):
        plan_sweep("demo", ["dpo.beta=0.1,0.2"], repo / "pipelines.yaml",
                   ["publish.enabled=true", "publish.repo_id=me/model"])


def test_the_comparison_table_shows_a_failed_variant():
    rows = [{"variant": "dpo.beta=0.1", "method": "dpo", "dpo_loss": 0.1234567, "train_reward_accuracy": 1.0,
             "heldout_accuracy": 0.9, "heldout_reward_margin": 2.0, "worst_forgetting_points": -1.5,
             "judged_win_rate": 0.75, "judged_lc_win_rate": 0.7, "gate": "passed", "dpo_stage": "ran"},
            {"variant": "dpo.beta=9", "method": "dpo", "error": "CollapseError: collapse at step 3", "run_dir": None}]
    table = comparison_markdown("demo", rows, ["one note"])
    assert "| dpo.beta=0.1 | dpo | 0.1235 | 1 | 0.9 | 2 | -1.5 | 0.75 | 0.7 | passed | ran |" in table
    assert "| dpo.beta=9 | dpo | CollapseError: collapse at step 3 | - |" in table and "- one note" in table
    assert "different scales" not in table and "nats" not in table  # one method, DPO's margin


def test_a_sweep_over_objectives_names_each_variant_s_method(repo):
    variants = plan_sweep("demo", ["dpo.method=dpo,orpo,simpo"], repo / "pipelines.yaml")
    assert [v.label for v in variants] == ["dpo.method=dpo", "dpo.method=orpo", "dpo.method=simpo"]
    assert [v.config.dpo.method for v in variants] == ["dpo", "orpo", "simpo"]
    assert [v.config.runs_sft for v in variants] == [True, False, True]  # the demo enables SFT; ORPO folds it in
    with pytest.raises(ConfigError) as e:  # the reference pass is DPO's: named for each variant it cannot serve
        plan_sweep("demo", ["dpo.method=dpo,orpo,simpo"], repo / "pipelines.yaml", ["dpo.precompute_ref_log_probs=true"])
    assert [p.split(":")[0] for p in e.value.problems] == ["variant dpo.method=orpo", "variant dpo.method=simpo"]

    rows = [{"variant": v.label, "method": v.config.dpo.method, "dpo_loss": 0.5} for v in variants]
    table = comparison_markdown("demo", rows)
    assert "| dpo.method=orpo | orpo | 0.5 |" in table
    assert "losses are on different scales" in table and "the log-ratio itself (nats)" in table
