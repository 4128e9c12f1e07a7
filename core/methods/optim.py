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
  (official Barlow Twins: 0.001), applied per optimisation step through a `LambdaLR`. With
  `min_lr` (official DINO `--min_lr 1e-6`) every group ends at that absolute lr instead: its
  `final` is min_lr / the group's base lr (DINO's `utils.cosine_scheduler(base, min_lr, ...)`).
- Weight-decay schedule (official DINO, https://github.com/facebookresearch/dino main_dino.py:
  `wd_schedule = cosine_scheduler(weight_decay, weight_decay_end, epochs, len(data_loader))`, set on
  `param_groups[0]` "only the first group is regularized" before every iteration):
  `cosine_schedule(step, total, wd, wd_end)` and `apply_weight_decay(optimizer, wd)`, which sets it on
  the decayed group ("weights") only; the bias/norm group keeps 0 (timm `Lars` and AdamW read the
  group's weight_decay at every step).
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
DECAYED_GROUPS = ("weights",)  # the parameter groups a weight-decay schedule changes


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


def final_factors(optimizer: torch.optim.Optimizer, min_lr: Optional[float]) -> list[float]:
    """Per group, the end of the cosine as a fraction of the group's base lr: FINAL_LR_FACTOR when
    min_lr is None, else min_lr / base lr (every group ends at min_lr)."""
    if min_lr is None:
        return [FINAL_LR_FACTOR for _ in optimizer.param_groups]
    out = []
    for g in optimizer.param_groups:
        base = float(g["lr"])
        if min_lr > base:
            raise ConfigError(f"min_lr={min_lr!r} must be <= the base learning rate {base:.3g} of group "
                              f"{g.get('name', '?')!r}; lower min_lr")
        out.append(min_lr / base if base > 0 else 0.0)
    return out


def configure_optimizers(params_module: nn.Module, name: str, lr: Optional[float], weight_decay: float,
                         batch_size: int, total_steps: int, warmup_steps: int, *, min_lr: Optional[float] = None,
                         **kw) -> dict:
    """Lightning `configure_optimizers` return value: optimizer + per-step warmup/cosine LambdaLR
    (ending at FINAL_LR_FACTOR x each group's base lr, or at `min_lr` for every group)."""
    opt = build_optimizer(params_module, name, lr, weight_decay, batch_size, **kw)
    total, warm = int(total_steps), int(warmup_steps)
    if min_lr is None:  # one lambda for every group (unchanged behaviour)
        lam = lambda s: warmup_cosine(s, total, warm)  # noqa: E731
    else:
        lam = [(lambda s, f=f: warmup_cosine(s, total, warm, final=f)) for f in final_factors(opt, min_lr)]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


def apply_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float,
                       groups: tuple[str, ...] = DECAYED_GROUPS) -> None:
    """Set `weight_decay` on the decayed parameter groups (by name) of `optimizer`; the others (biases
    and norms, weight decay 0) are left alone."""
    for g in optimizer.param_groups:
        if g.get("name") in groups:
            g["weight_decay"] = float(weight_decay)


def cosine_schedule(step: int, total: int, start: float, end: float) -> float:
    """Cosine from `start` (step 0) to `end` (step total), e.g. DINO's teacher momentum 0.996 -> 1."""
    total = max(int(total), 1)
    t = min(max(step, 0), total) / total
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))
