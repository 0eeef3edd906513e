"""Each DPO pair's prompt runs through the model once instead of twice.

TRL batches B pairs as 2B right-padded rows, B of `prompt + chosen` then B of `prompt + rejected`,
so every prompt token is computed twice, in the policy forward, its backward and the reference
forward. Here the batch is rewritten as one flat row that holds each prompt once:

    prompt[:-1] | prompt[-1] + chosen | prompt[-1] + rejected | next pair ...

with an attention pattern where each answer sees its own prompt and itself, never the other answer
or another pair, and position ids that restart both answers where the prompt ends. Every completion
token then sees exactly the context it sees in TRL's layout, so the log-probs are the same numbers
(to float rounding). The prompt's last token goes with each answer because it predicts the answer's
first token: two labels for one position otherwise.

The log-probs come from TRL's own fused LM head (called with `shift_labels`), and are put back into
TRL's (2B, L-1) layout, so TRL's loss, metrics and every loss type run unchanged. A batch this layout
cannot represent (prompts that differ within a pair, an empty completion, left padding) takes TRL's
ordinary path.

Attention: Unsloth's shared-prefix FlexAttention kernel (`prefix_seg_info`, written for GRPO's
shared prompts) on the Unsloth backend; a 4D mask through transformers' SDPA or eager attention on
the TRL + PEFT backend.
"""

from __future__ import annotations

import types
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the CLI imports this module and needs no torch
    import torch

IGNORE = -100


@dataclass(frozen=True)
class SharedLayout:
    flat_ids: torch.Tensor        # (1, T)
    position_ids: torch.Tensor    # (1, T)
    shift_labels: torch.Tensor    # (1, T): the token each flat position predicts, or -100
    group: torch.Tensor           # (T,) pair index of each flat token
    answer: torch.Tensor          # (T,) -1 for a shared prompt token, else a unique answer id
    groups: list[tuple[int, list[int]]]  # per pair: (shared prompt length, [answer segment lengths])
    rows: torch.Tensor            # (N,) TRL row of each scored token
    cols: torch.Tensor            # (N,) its column in TRL's (2B, L-1) log-prob layout
    flat: torch.Tensor            # (N,) the flat position whose output scores it
    shape: tuple[int, int]        # (2B, L-1)

    @property
    def tokens_saved(self) -> int:
        return sum(prompt for prompt, _ in self.groups)


def plan_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor) -> SharedLayout | str:
    """The flat layout of a TRL DPO batch, or why the batch is not one it can represent."""
    import torch

    if input_ids is None or labels is None or input_ids.dim() != 2 or input_ids.shape[0] % 2:
        return "not 2B rows of token ids with labels"
    rows, width = input_ids.shape
    pairs = rows // 2
    ids = input_ids.tolist()
    scored = (labels != IGNORE).tolist()
    valid = (attention_mask.sum(dim=1) if attention_mask is not None else torch.full((rows,), width)).tolist()
    if attention_mask is not None and not _right_padded(attention_mask):
        return "not right-padded"

    spans = []  # per row: (prompt length, completion length)
    for r in range(rows):
        start = next((c for c, s in enumerate(scored[r]) if s), None)
        if start is None or start == 0 or not all(scored[r][start:valid[r]]) or any(scored[r][valid[r]:]):
            return "a row without a prompt followed by one contiguous completion"
        spans.append((start, valid[r] - start))

    flat_ids, positions, targets, group, answer = [], [], [], [], []
    out_rows, out_cols, out_flat, groups = [], [], [], []
    for p in range(pairs):
        chosen_row, rejected_row = p, p + pairs
        prompt = spans[chosen_row][0]
        if spans[rejected_row][0] != prompt or ids[chosen_row][:prompt] != ids[rejected_row][:prompt]:
            return "a pair whose chosen and rejected rows differ in the prompt"
        shared = prompt - 1
        flat_ids += ids[chosen_row][:shared]
        positions += range(shared)
        targets += [IGNORE] * shared
        group += [p] * shared
        answer += [-1] * shared
        lengths = []
        for r in (chosen_row, rejected_row):
            completion = spans[r][1]
            segment = ids[r][shared:prompt + completion]  # prompt's last token + the completion
            base = len(flat_ids)
            flat_ids += segment
            positions += range(shared, shared + len(segment))
            targets += ids[r][prompt:prompt + completion] + [IGNORE]
            group += [p] * len(segment)
            answer += [2 * p + (r != chosen_row)] * len(segment)
            out_rows += [r] * completion
            out_cols += range(shared, shared + completion)
            out_flat += range(base, base + completion)
            lengths.append(len(segment))
        groups.append((shared, lengths))

    device = input_ids.device

    def tensor(values, dtype=torch.long):
        return torch.tensor(values, dtype=dtype, device=device)

    return SharedLayout(
        flat_ids=tensor(flat_ids).unsqueeze(0).to(input_ids.dtype), position_ids=tensor(positions).unsqueeze(0),
        shift_labels=tensor(targets).unsqueeze(0), group=tensor(group), answer=tensor(answer), groups=groups,
        rows=tensor(out_rows), cols=tensor(out_cols), flat=tensor(out_flat), shape=(rows, width - 1))


def _right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row is ones then zeros."""
    mask = attention_mask.bool()
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def attention_mask_4d(layout: SharedLayout, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, T, T): query q sees key k when both are in the same pair, k <= q, and k is a shared
    prompt token or in q's own answer. `kind` "bool" (True = attend, for SDPA) or "additive" (0 or the
    dtype's minimum, for eager attention)."""
    import torch

    n = layout.group.numel()
    index = torch.arange(n, device=layout.group.device)
    same_pair = layout.group[:, None] == layout.group[None, :]
    visible = (layout.answer[None, :] == -1) | (layout.answer[:, None] == layout.answer[None, :])
    keep = same_pair & visible & (index[None, :] <= index[:, None])
    if kind == "bool":
        return keep[None, None]
    mask = torch.zeros(n, n, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
    return mask[None, None]


def to_trl_layout(layout: SharedLayout, flat: torch.Tensor | None) -> torch.Tensor | None:
    """A (1, T) per-position output of the fused head, moved to TRL's (2B, L-1) layout (zeros elsewhere,
    as TRL's own head leaves them); differentiable."""
    if flat is None:
        return None
    out = flat.new_zeros(layout.shape)
    return out.index_put((layout.rows, layout.cols), flat[0, layout.flat])


def _attention_kwargs(model, layout: SharedLayout, engine: str) -> dict[str, Any]:
    if engine == "unsloth":
        from unsloth.utils.prefix_grouper_kernel import build_seg_info_multigroup

        seg, _ = build_seg_info_multigroup(layout.groups, layout.flat_ids.device)
        return {"prefix_seg_info": seg}
    kind = "bool" if model.config._attn_implementation == "sdpa" else "additive"
    return {"attention_mask": attention_mask_4d(layout, kind, model.dtype)}


def _attention_quirk(config) -> str | None:
    """What of this model's attention the shared layout does not reproduce: a sliding window (one
    mask serves every layer here, full and windowed alike) or logit softcapping (Unsloth's
    shared-prefix kernel does not apply it)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "attn_logit_softcapping", None):
        return "attention logit softcapping"
    layer_types = getattr(text, "layer_types", None) or []
    windowed = getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
    if windowed or any("sliding" in str(t) for t in layer_types):
        return "sliding-window attention"
    return None


def supported_engine(model, backend: str) -> tuple[str | None, str]:
    """(engine, why): the attention this model can run the shared layout with, or None and the reason."""
    quirk = _attention_quirk(model.config)
    if quirk:
        return None, f"{quirk} is not reproduced by the shared layout"
    if backend == "unsloth":
        try:
            import unsloth.utils.prefix_grouper_kernel  # noqa: F401
        except ImportError as err:
            return None, f"this Unsloth has no shared-prefix attention kernel ({err})"
        return "unsloth", "Unsloth's shared-prefix FlexAttention kernel"
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation in ("sdpa", "eager"):
        return "mask", f"a 4D attention mask through {implementation} attention"
    return None, f"attention implementation {implementation!r} takes no 4D mask"


def install(trainer, backend: str) -> str:
    """Route the trainer's fused-head calls (policy, on-the-fly reference, precomputed reference)
    through the shared layout. Returns what was done, for the log."""
    from peft import PeftModel

    model = trainer.model
    target = model.get_base_model() if isinstance(model, PeftModel) else model
    engine, why = supported_engine(target, backend)
    if engine is None:
        return f"prompt sharing off: {why}"
    fused_forward = target.forward  # TRL's fused LM head, installed by DPOTrainer.__init__
    # Per forward call: shared, or fallen back to TRL's layout (counted by reason).
    stats = trainer.__dict__.setdefault("prompt_sharing", {"shared_batches": 0, "prompt_tokens_saved": 0,
                                                           "fallbacks": {}})

    last: list = [None, None, None]  # weak references to (input_ids, labels), and what was planned for them

    def plan_for(input_ids, attention_mask, labels) -> tuple[SharedLayout, dict[str, Any]] | str:
        """(layout, attention kwargs), or why the batch keeps TRL's layout. The policy and the reference
        forward of one step get the same tensors: plan once (planning reads the batch back to the CPU,
        which waits for the GPU, and builds the attention mask)."""
        if last[0] is not None and last[0]() is input_ids and last[1]() is labels:
            return last[2]
        layout = plan_layout(input_ids, attention_mask, labels)
        planned = layout if isinstance(layout, str) else (layout, _attention_kwargs(target, layout, engine))
        if input_ids is not None and labels is not None:
            last[:] = [weakref.ref(input_ids), weakref.ref(labels), planned]
        return planned

    def shared_forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        if not fused_lm_head:  # generation and other plain calls
            return fused_forward(*args, labels=labels, **kwargs)
        if args or kwargs.get("output_router_logits") or "shift_labels" in kwargs:
            planned = "positional inputs, router logits or pre-shifted labels"
        else:
            planned = plan_for(kwargs.get("input_ids"), kwargs.get("attention_mask"), labels)
        if isinstance(planned, str):
            stats["fallbacks"][planned] = stats["fallbacks"].get(planned, 0) + 1
            return fused_forward(*args, fused_lm_head=True, labels=labels, **kwargs)
        layout, attention = planned
        stats["shared_batches"] += 1
        stats["prompt_tokens_saved"] += layout.tokens_saved
        rest = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "position_ids")}
        out = fused_forward(input_ids=layout.flat_ids, position_ids=layout.position_ids,
                            shift_labels=layout.shift_labels, fused_lm_head=True, **attention, **rest)
        for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask"):
            setattr(out, name, to_trl_layout(layout, getattr(out, name, None)))
        out.loss = -out.log_probs.sum() / out.label_mask.sum().clamp(min=1)
        return out

    target.forward = types.MethodType(shared_forward, target)
    return f"prompt sharing on: {why}"
