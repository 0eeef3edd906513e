"""Prompt sharing (dpoflow/engine/prompt_sharing.py) gives TRL's own numbers from fewer tokens."""

import math

import pytest
import torch

from dpoflow.engine.prompt_sharing import IGNORE, attention_mask_4d, plan_layout, to_trl_layout


def _batch(prompts, chosen, rejected, pad=0):
    """A TRL-style DPO batch: B chosen rows then B rejected rows, right-padded; labels -100 on the
    prompt and the padding."""
    rows = [p + c for p, c in zip(prompts, chosen)] + [p + r for p, r in zip(prompts, rejected)]
    prompt_lengths = [len(p) for p in prompts] * 2
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = ids.clone()
    for i, (n, r) in enumerate(zip(prompt_lengths, rows)):
        labels[i, :n] = IGNORE
        labels[i, len(r):] = IGNORE
    return ids, mask, labels


def test_layout_holds_each_prompt_once_and_maps_every_completion_token_back():
    ids, mask, labels = _batch([[1, 2, 3], [4, 5]], [[6, 7], [8]], [[9], [10, 11, 12]])
    layout = plan_layout(ids, mask, labels)
    # pair 0: prompt[:-1] = 1 2 | 3 6 7 | 3 9 ; pair 1: 4 | 5 8 | 5 10 11 12
    assert layout.flat_ids.tolist() == [[1, 2, 3, 6, 7, 3, 9, 4, 5, 8, 5, 10, 11, 12]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 1, 2, 3, 4]]
    assert layout.shift_labels.tolist() == [[IGNORE, IGNORE, 6, 7, IGNORE, 9, IGNORE, IGNORE, 8, IGNORE, 10, 11,
                                             12, IGNORE]]
    assert layout.groups == [(2, [3, 2]), (1, [2, 4])]
    assert layout.tokens_saved == 3  # 18 tokens in TRL's rows (unpadded) -> 14 + the 2 duplicated last tokens
    # Every scored token lands where TRL's (2B, L-1) log-probs keep it: column = its position - 1.
    shifted = labels[:, 1:]
    scored = {(r, c) for r, c in zip(layout.rows.tolist(), layout.cols.tolist())}
    assert scored == {(r, c) for r, c in (shifted != IGNORE).nonzero().tolist()}
    flat_targets = layout.shift_labels[0, layout.flat]
    assert torch.equal(flat_targets, shifted[layout.rows, layout.cols])


def test_mask_lets_each_answer_see_its_prompt_and_itself_only():
    ids, mask, labels = _batch([[1, 2, 3]], [[6, 7]], [[9]])
    layout = plan_layout(ids, mask, labels)  # flat: 1 2 | 3 6 7 | 3 9
    keep = attention_mask_4d(layout, "bool", torch.float32)[0, 0].int().tolist()
    assert keep == [[1, 0, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0, 0],
                    [1, 1, 1, 0, 0, 0, 0],
                    [1, 1, 1, 1, 0, 0, 0],
                    [1, 1, 1, 1, 1, 0, 0],
                    [1, 1, 0, 0, 0, 1, 0],
                    [1, 1, 0, 0, 0, 1, 1]]
    additive = attention_mask_4d(layout, "additive", torch.float32)[0, 0]
    assert torch.equal(additive == 0, torch.tensor(keep, dtype=torch.bool))


@pytest.mark.parametrize("case", ["different prompts", "empty completion", "left padding", "odd rows"])
def test_batches_it_cannot_represent_take_trl_s_path(case):
    if case == "different prompts":
        ids, mask, labels = _batch([[1, 2, 3]], [[6]], [[9]])
        ids[1, 0] = 4
    elif case == "empty completion":
        ids, mask, labels = _batch([[1, 2, 3]], [[6]], [[]])
    elif case == "left padding":
        ids, mask, labels = _batch([[1, 2, 3]], [[6, 7]], [[9]])
        mask = mask.flip(1)
    else:
        ids, mask, labels = _batch([[1, 2, 3]], [[6]], [[9]])
        ids, mask, labels = ids[:1], mask[:1], labels[:1]
    assert isinstance(plan_layout(ids, mask, labels), str)


@pytest.mark.parametrize("fields, reason", [({"sliding_window": 512}, "sliding-window"),
                                            ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding-window"),
                                            ({"attn_logit_softcapping": 50.0}, "softcapping")])
def test_models_whose_attention_the_layout_cannot_reproduce_keep_trl_s_path(fields, reason):
    from types import SimpleNamespace

    from dpoflow.engine.prompt_sharing import supported_engine

    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa", **fields))
    for backend in ("trl", "unsloth"):
        engine, why = supported_engine(model, backend)
        assert engine is None and reason in why
    plain = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa", sliding_window=None))
    assert supported_engine(plain, "trl")[0] == "mask"


def test_to_trl_layout_is_differentiable():
    ids, mask, labels = _batch([[1, 2]], [[6, 7]], [[9]])
    layout = plan_layout(ids, mask, labels)
    flat = torch.randn(1, layout.flat_ids.shape[1], requires_grad=True)
    out = to_trl_layout(layout, flat)
    assert out.shape == (2, ids.shape[1] - 1)
    out.sum().backward()
    assert flat.grad[0, layout.flat].eq(1).all() and flat.grad.sum() == len(layout.flat)


def _trainer_for(start, data, share, backend, scratch):
    from dpoflow.engine.backends import choose_backend
    from dpoflow.base.config import DPOSpec, TrainSetup
    from dpoflow.base.hardware import plan_stage
    from dpoflow.tasks.dpo import _train_rows, _trainer

    setup = TrainSetup(backend=backend, **({"precision": "bf16", "quantize": "none"} if backend == "unsloth" else {}))
    spec = DPOSpec(max_steps=1, per_device_batch_size=4, gradient_accumulation_steps=1, share_prompt=share,
                   loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    plan = plan_stage(setup, spec, start.path)
    return _trainer(choose_backend(setup), start, _train_rows(data, None), spec, plan, 0, scratch, 1e-3, 1, [], None)


# TRL + PEFT on CPU runs in float32: equal to float rounding. Unsloth on a GPU runs in bf16 with other
# attention kernels (FlexAttention vs flash): equal to bf16 rounding.
# Margins are differences of differences of log-probs, so their bf16 error is absolute, not relative.
TOLERANCE = {"trl": dict(rel=1e-5, metric=1e-4, abs=1e-5, ref=1e-4, grad=1e-4),
             "unsloth": dict(rel=2e-3, metric=2e-2, abs=2e-3, ref=5e-2, grad=5e-2)}


# The trl case checks float32 equality, which TRL + PEFT gives on CPU (on a GPU it trains in bf16).
@pytest.mark.parametrize("backend", [pytest.param("trl", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                                  reason="float32 on CPU")),
                                     pytest.param("unsloth", marks=pytest.mark.gpu)])
def test_shared_prompt_step_equals_trl_s_layout(tiny_model, tmp_path, backend):
    """The whole DPO step, TRL's layout vs the shared one, on pairs with prompts of different lengths
    and answers of different lengths: same loss, metrics, reference log-probs and LoRA gradients."""
    if backend == "unsloth":
        pytest.importorskip("unsloth")
    tol = TOLERANCE[backend]
    from dpoflow.base.artifacts import write_jsonl
    from dpoflow.base.records import ModelRef, PreparedData

    rows = [{"prompt": f"<|begin|><|user|>\n{'word ' * (3 + 2 * i)}question {i}<|end|>\n<|assistant|>\n",
             "chosen": "yes " * (1 + i % 3) + "<|end|>", "rejected": "no " * (3 - i % 3) + "<|end|>"}
            for i in range(8)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    data = PreparedData(path=str(tmp_path), digest="t", train=str(tmp_path / "train.jsonl"), heldout="", rejected="",
                        counts={})
    start = ModelRef(path=str(tiny_model), digest="t", source="builtin:tiny-llama", role="base")

    results = {}
    for share in (False, True):
        trainer = _trainer_for(start, data, share, backend, tmp_path / f"scratch-{share}")
        model = trainer.model
        torch.manual_seed(0)
        for name, p in model.named_parameters():  # a non-zero adapter, so policy != reference
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
        batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
        model.train()
        loss = trainer._compute_loss(model, batch, return_outputs=False)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        with torch.no_grad():
            ref = trainer.compute_ref_log_probs(model, batch)
        results[share] = loss.item(), grads, metrics, ref, dict(getattr(trainer, "prompt_sharing", {}))

    (loss0, grads0, metrics0, ref0, _), (loss1, grads1, metrics1, ref1, stats) = results[False], results[True]
    assert stats["shared_batches"] == 3 and sum(stats["fallbacks"].values()) == 0  # policy, reference, ref pass
    assert stats["prompt_tokens_saved"] > 0
    assert not math.isclose(loss0, math.log(2), abs_tol=1e-3)  # the adapter does move the policy
    assert math.isclose(loss0, loss1, rel_tol=tol["rel"])
    for k in ("rewards/margins", "logps/chosen", "logps/rejected", "entropy", "mean_token_accuracy",
              "logits/chosen"):
        assert math.isclose(metrics0[k], metrics1[k], rel_tol=tol["metric"], abs_tol=tol["abs"]), (k, metrics0[k], metrics1[k])
    for a, b in zip(ref0, ref1):
        assert torch.allclose(a.float(), b.float(), rtol=tol["ref"], atol=tol["ref"]), (a, b)
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    for name in grads0:
        a, b = grads0[name].float().flatten(), grads1[name].float().flatten()
        assert (a - b).norm() <= tol["grad"] * a.norm() + 1e-8, (name, (a - b).norm().item(), a.norm().item())


@pytest.mark.skipif(torch.cuda.is_available(), reason="TRL backend on CPU; on a GPU box an earlier test's Unsloth "
                                                            "import has patched TRL in this process")
def test_the_stage_reports_what_prompt_sharing_did(tmp_path, yes_no_pairs):
    import json

    from dpoflow.base.config import DPOSpec, TrainSetup
    from dpoflow.base.hardware import plan_stage
    from dpoflow.tasks.dpo import train_dpo

    start, data, _ = yes_no_pairs
    setup = TrainSetup(backend="trl")
    for share in (True, False):
        spec = DPOSpec(max_steps=2, per_device_batch_size=4, gradient_accumulation_steps=1, share_prompt=share)
        train_dpo(start, data, spec, setup, plan_stage(setup, spec, start.path), 0, tmp_path / str(share))
        metrics = json.loads((tmp_path / str(share) / "dpo_metrics.json").read_text())
        if share:  # 2 steps x (policy + on-the-fly reference) forwards, all shared
            assert metrics["prompt_sharing/shared_batches"] == 4 and metrics["prompt_sharing/fallback_batches"] == 0
            assert metrics["prompt_sharing/prompt_tokens_saved"] > 0
        else:
            assert not any(k.startswith("prompt_sharing/") for k in metrics)
