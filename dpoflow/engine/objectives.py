"""The preference objectives the dpo stage trains with (`dpo.method`), each as TRL's trainer and config.

- dpo: `DPOTrainer`; the reference is the start model with the adapter off (`ref_model=None`).
- orpo: `ORPOTrainer`; the SFT loss on the chosen answers minus lambda (`beta`) times the log-sigmoid of
  the log odds ratio of chosen over rejected. No reference model.
- simpo: `CPOTrainer` with `loss_type="simpo"` and `cpo_alpha=0` (no behaviour-cloning term), which is
  SimPO: -log sigmoid(beta * (mean token log-prob of chosen - of rejected) - gamma). No reference model.

TRL 1.15 and 1.16 keep ORPO and CPO under `trl.experimental`. The classes are looked up when a stage
builds its trainer, after the training backend was activated: Unsloth, imported first, patches the
trainers TRL then hands out.
"""

from __future__ import annotations

import warnings
from typing import Any

from dpoflow.base.config import SIMPO_GAMMA, DPOSpec

# What each reference-free method's TRL trainer logs beyond DPO's names (rewards/*, logps/*).
EXTRA_LOGGED = {"orpo": ("nll_loss", "log_odds_ratio", "log_odds_chosen"), "simpo": ()}


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
    raise ValueError(f"unknown dpo.method {spec.method!r}")


def reference_text(spec: DPOSpec, start: str, how: str) -> str:
    """What training compared the policy with, for the run summary: `start` (the start model) `how`
    (with the adapter off, computed when), or nothing for a reference-free method."""
    if spec.reference_free:
        return f"none: {spec.method} is reference-free (it trained the {start} with no reference)"
    return f"{start} {how}"
