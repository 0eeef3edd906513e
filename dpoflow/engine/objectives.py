"""The preference objectives the dpo stage trains with (`dpo.method`), each as TRL's trainer and config.

- dpo: `DPOTrainer`; the reference is the start model with the adapter off (`ref_model=None`).
- orpo: `ORPOTrainer`; the SFT loss on the chosen answers minus lambda (`beta`) times the log-sigmoid of
  the log odds ratio of chosen over rejected. No reference model.
- simpo: `CPOTrainer` with `loss_type="simpo"` and `cpo_alpha=0` (no behaviour-cloning term), which is
  SimPO: -log sigmoid(beta * (mean token log-prob of chosen - of rejected) - gamma). No reference model.
- kto: `KTOTrainer`; unpaired examples (prompt, completion, label), each completion's log-ratio against the
  reference (the start model with the adapter off, `ref_model=None`, as DPO) pushed above (label true) or
  below (false) a KL estimate taken from the other completions of its micro-batch, weighted by
  `desirable_weight` / `undesirable_weight`.

TRL 1.15 and 1.16 keep ORPO and CPO under `trl.experimental`; TRL 1.16 has KTO in `trl` (its
`trl.experimental.kto` only warns that it moved), older releases under `trl.experimental.kto`. The classes
are looked up when a stage builds its trainer, after the training backend was activated: Unsloth, imported
first, patches the trainers TRL then hands out.
"""

from __future__ import annotations

import warnings
from typing import Any

from dpoflow.base.config import SIMPO_GAMMA, DPOSpec

# What each reference-free method's TRL trainer logs beyond DPO's names (rewards/*, logps/*).
EXTRA_LOGGED = {"orpo": ("nll_loss", "log_odds_ratio", "log_odds_chosen"), "simpo": (), "kto": ("kl",)}


def trainer_classes(method: str) -> tuple[type, type]:
    """(trainer class, config class) of TRL for `method`."""
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer, DPOConfig
    from trl.import_utils import TRLExperimentalWarning

    # TRL warns on every import from trl.experimental; the pinned TRL range (pyproject) is what is supported.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TRLExperimentalWarning)
        if method == "orpo":
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

            return ORPOTrainer, ORPOConfig
        if method == "simpo":
            from trl.experimental.cpo import CPOConfig, CPOTrainer

            return CPOTrainer, CPOConfig
        if method == "kto":
            try:
                from trl import KTOConfig, KTOTrainer
            except ImportError:  # before KTO moved into TRL's stable API
                from trl.experimental.kto import KTOConfig, KTOTrainer

            return KTOTrainer, KTOConfig
    raise ValueError(f"unknown dpo.method {method!r}")


def objective_args(spec: DPOSpec) -> dict[str, Any]:
    """The keyword arguments of the method's TRL config that say which loss it computes."""
    if spec.method == "dpo":
        return dict(beta=spec.beta, loss_type=list(spec.loss_type), loss_weights=spec.loss_weights,
                    label_smoothing=spec.label_smoothing)
    if spec.method == "orpo":
        return dict(beta=spec.beta)  # ORPO's lambda
    if spec.method == "simpo":
        gamma = SIMPO_GAMMA if spec.simpo_gamma is None else spec.simpo_gamma
        return dict(beta=spec.beta, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=gamma)
    if spec.method == "kto":
        return dict(beta=spec.beta, loss_type="kto", desirable_weight=spec.desirable_weight or 1.0,
                    undesirable_weight=spec.undesirable_weight or 1.0)
    raise ValueError(f"unknown dpo.method {spec.method!r}")


def reference_text(spec: DPOSpec, start: str, how: str) -> str:
    """What training compared the policy with, for the run summary: `start` (the start model) `how`
    (with the adapter off, computed when), or nothing for a reference-free method."""
    if spec.reference_free:
        return f"none: {spec.method} is reference-free (it trained the {start} with no reference)"
    return f"{start} {how}"
