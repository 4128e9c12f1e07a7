"""The five evaluations of the seed study as named presets of `SegmentConfig` overrides.

The one declaration of the evaluations: the config (`SegmentConfig.evaluation`), the CLI, the grid
and the report read their names, labels and settings from here.

Each preset: `short` (the report's label), `description` (one line), `pretrain_method` (the stage-1 method whose backbone it
evaluates: the grid feeds it that run's checkpoint), `config` (SegmentConfig fields), and optionally
`baseline` (the evaluation it is compared with: the report gives the mean difference of each of its rows
against the baseline's row of the same pretraining, with a 95% interval over seeds) with `baseline_reason`
(what that difference isolates).
`apply_evaluation(cfg_dict, evaluation)` puts a preset UNDER the user's explicit values (anything
the user set wins) and records `evaluation` in the result.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

from core.errors import ConfigError

EVALUATIONS: dict[str, dict[str, Any]] = {
    "E1": {
        "short": "BT ResNet-50 + DeepLabV3",
        "description": "Barlow Twins ResNet-50 + DeepLabV3 (ASPP) head",
        "pretrain_method": "barlow_twins",
        "config": {"backbone": "resnet50", "head": "deeplabv3", "fusion": "none"},
    },
    "E2": {
        "short": "BT transformer, no attention",
        "description": "Barlow Twins ViT + segmentation head without attention maps (SETR-PUP)",
        "pretrain_method": "barlow_twins",
        "config": {"backbone": "vit_small_patch16", "head": "setr_pup", "fusion": "none"},
    },
    "E3": {
        "short": "BT transformer + fusion 1 (attention as features)",
        "description": "Barlow Twins ViT / Swin + SETR-PUP with attention as features (fusion 1: CLS maps, on Swin the "
                       "attention each token receives, as channels)",
        "pretrain_method": "barlow_twins",
        "config": {"backbone": "vit_small_patch16", "head": "setr_pup", "fusion": "features"},
        "baseline": "E2",
        "baseline_reason": "fusion 1 vs no attention: same checkpoint, backbone and head",
    },
    "E4": {
        "short": "BT transformer + fusion 2 (attention as affinity)",
        "description": "Barlow Twins ViT / Swin + SETR-PUP with attention as affinity (fusion 2: logit propagation; "
                       "on Swin within the last stage's windows)",
        "pretrain_method": "barlow_twins",
        "config": {"backbone": "vit_small_patch16", "head": "setr_pup", "fusion": "affinity"},
        "baseline": "E2",
        "baseline_reason": "fusion 2 vs no attention: same checkpoint, backbone and head",
    },
    "E5": {
        "short": "DINO weights + fusion 2",
        "description": "DINO ViT weights + SETR-PUP with attention as affinity (fusion 2)",
        "pretrain_method": "dino",
        "config": {"backbone": "vit_small_patch16", "head": "setr_pup", "fusion": "affinity", "source": "dino"},
        "baseline": "E4",
        "baseline_reason": "DINO vs Barlow Twins pretraining: same backbone, head and fusion 2",
    },
}


def get_evaluation(name: str) -> dict[str, Any]:
    if name not in EVALUATIONS:
        raise ConfigError(f"evaluation={name!r} is not known; choose one of: {', '.join(EVALUATIONS)}")
    return copy.deepcopy(EVALUATIONS[name])


def apply_evaluation(cfg_dict: Optional[dict], evaluation: Optional[str] = None) -> dict:
    """Merge preset `evaluation` (default: cfg_dict['evaluation']) under the explicit values of
    `cfg_dict` (keys whose value is None count as not given). Returns a new dict."""
    given = {k: v for k, v in dict(cfg_dict or {}).items() if v is not None}
    name = evaluation if evaluation is not None else given.get("evaluation")
    if name is None:
        return given
    preset = get_evaluation(name)
    out = dict(preset["config"])
    out.update(given)
    out["evaluation"] = name
    return out
