"""Optimisers and the per-step learning-rate schedule of the pretraining methods.

- LARS (timm `Lars`), official Barlow Twins recipe
  (https://github.com/facebookresearch/barlowtwins/blob/main/main.py): two parameter groups,
  weights (ndim > 1) with weight decay and LARS adaptation, biases and norm parameters (ndim <= 1)
  with neither. timm's `Lars` applies the trust ratio only to groups whose weight_decay != 0 unless
  `always_adapt=True`; the bias/norm group therefore gets weight_decay=0 and always_adapt=False,
  i.e. a plain SGD-with-momentum update. lr = 0.2 (weights) / 0.0048 (biases) x batch / 256, momentum
  0.9, trust coefficient 0.001.
- AdamW: lr = 5e-4 x batch / 256 (DINO's recipe), no weight decay on biases and norm parameters.
- `warmup_cosine(step, total, warmup)`: linear warmup from 0 then cosine decay to `final` x base
  (official Barlow Twins: 0.001), applied per optimisation step through a `LambdaLR`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from core.errors import ConfigError

LARS_LR_WEIGHTS = 0.2
LARS_LR_BIASES = 0.0048
ADAMW_LR = 5e-4
LARS_MOMENTUM = 0.9
LARS_TRUST_COEFF = 0.001
FINAL_LR_FACTOR = 0.001


def split_decay_groups(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights, biases_and_norms): trainable parameters with ndim > 1 vs ndim <= 1."""
    weights, others = [], []
    seen: set[int] = set()
    for _, p in module.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (weights if p.ndim > 1 else others).append(p)
    return weights, others


def recipe_lrs(name: str, lr: Optional[float], batch_size: int) -> tuple[float, float]:
    """(lr_weights, lr_biases). lr=None: the official recipe scaled by batch/256; an explicit lr is the
    weights' lr (LARS biases keep the official 0.0048/0.2 ratio; AdamW uses one lr for both)."""
    scale = batch_size / 256.0
    if name == "lars":
        if lr is None:
            return LARS_LR_WEIGHTS * scale, LARS_LR_BIASES * scale
        return float(lr), float(lr) * LARS_LR_BIASES / LARS_LR_WEIGHTS
    if name == "adamw":
        base = ADAMW_LR * scale if lr is None else float(lr)
        return base, base
    raise ConfigError(f"optimizer={name!r} is not allowed; choose one of: lars, adamw")


def build_optimizer(params_module: nn.Module, name: str, lr: Optional[float], weight_decay: float,
                    batch_size: int, *, trust_coeff: float = LARS_TRUST_COEFF) -> torch.optim.Optimizer:
    """LARS or AdamW over `params_module`'s trainable parameters; biases/norms: no decay, no adaptation."""
    lr_w, lr_b = recipe_lrs(name, lr, batch_size)
    weights, others = split_decay_groups(params_module)
    if name == "lars":
        from timm.optim import Lars

        groups = [
            {"params": weights, "lr": lr_w, "weight_decay": weight_decay, "always_adapt": True, "name": "weights"},
            # weight_decay=0 and always_adapt=False: timm skips the trust ratio for this group
            {"params": others, "lr": lr_b, "weight_decay": 0.0, "always_adapt": False, "name": "biases_norms"},
        ]
        groups = [g for g in groups if g["params"]]
        return Lars(groups, lr=lr_w, momentum=LARS_MOMENTUM, trust_coeff=trust_coeff, trust_clip=False)
    groups = [
        {"params": weights, "lr": lr_w, "weight_decay": weight_decay, "name": "weights"},
        {"params": others, "lr": lr_b, "weight_decay": 0.0, "name": "biases_norms"},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr_w, weight_decay=weight_decay)


def warmup_cosine(step: int, total: int, warmup: int, final: float = FINAL_LR_FACTOR) -> float:
    """Multiplier of the base lr at optimisation step `step` (0-based): linear 0 -> 1 over `warmup`
    steps, then cosine 1 -> `final` at `total` (official Barlow Twins `adjust_learning_rate`)."""
    total = max(int(total), 1)
    warmup = max(0, min(int(warmup), total))
    if warmup > 0 and step < warmup:
        return step / warmup
    span = max(total - warmup, 1)
    t = min(max(step - warmup, 0), span) / span
    q = 0.5 * (1.0 + math.cos(math.pi * t))
    return q + final * (1.0 - q)


def configure_optimizers(params_module: nn.Module, name: str, lr: Optional[float], weight_decay: float,
                         batch_size: int, total_steps: int, warmup_steps: int, **kw) -> dict:
    """Lightning `configure_optimizers` return value: optimizer + per-step warmup/cosine LambdaLR."""
    opt = build_optimizer(params_module, name, lr, weight_decay, batch_size, **kw)
    total, warm = int(total_steps), int(warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warm))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


def cosine_schedule(step: int, total: int, start: float, end: float) -> float:
    """Cosine from `start` (step 0) to `end` (step total), e.g. DINO's teacher momentum 0.996 -> 1."""
    total = max(int(total), 1)
    t = min(max(step, 0), total) / total
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))
