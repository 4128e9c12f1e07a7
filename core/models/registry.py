"""Backbone registry: names -> builder functions (nothing is eval'ed).

`create_backbone(name, image_size=224, **kw)`, `list_backbones()`, `check_backbone_name(field, name)`.

Stochastic depth: `create_backbone(name, drop_path_rate=r)` for the timm ViTs and Swins
(`DROP_PATH_BACKBONES`; timm's linearly increasing per-block rate, as official DINO's
`vision_transformer.py`); `check_drop_path(field, rate, name)` refuses a non-zero rate for the other
backbones (torchvision ResNets and vit-pytorch have no drop path); `disable_drop_path(module)` turns
every timm DropPath of a module off (DINO's teacher, a deep copy of the student) and
`drop_path_rates(module)` lists them.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from core.errors import ConfigError
from core.models.backbones.base import Backbone
from core.models.backbones.resnet import resnet18, resnet50, resnet_tiny
from core.models.backbones.swin import SWIN_ARCHS, make_swin
from core.models.backbones.vit import VIT_ARCHS, make_vit
from core.models.backbones.vit_pytorch import VITPYTORCH_ARCHS, make_vitpytorch

BACKBONES: dict[str, Callable[..., Backbone]] = {
    "resnet50": resnet50,
    "resnet18": resnet18,
    "resnet_tiny": resnet_tiny,
    **{name: make_vit(name) for name in VIT_ARCHS},
    **{name: make_swin(name) for name in SWIN_ARCHS},
    **{name: make_vitpytorch(name) for name in VITPYTORCH_ARCHS},
}

#: backbones cheap enough for CPU tests and the smoke grid
TINY_BACKBONES = ("resnet_tiny", "vit_nano_patch8", "swin_nano")

#: backbones whose builder takes `drop_path_rate` (timm models: stochastic depth in every block)
DROP_PATH_BACKBONES = (*VIT_ARCHS, *SWIN_ARCHS)


def list_backbones() -> list[str]:
    """All registered backbone names, in registration order."""
    return list(BACKBONES)


def check_backbone_name(field: str, name: str) -> str:
    """Return `name` if registered, else ConfigError naming the field and listing the choices."""
    if not isinstance(name, str) or name not in BACKBONES:
        raise ConfigError(f"{field}={name!r} is not known; choose one of: {', '.join(BACKBONES)}")
    return name


def create_backbone(name: str, image_size: int = 224, **kw) -> Backbone:
    """Build a randomly initialised backbone (load weights with `core.weights.load_source`)."""
    check_backbone_name("backbone", name)
    try:
        return BACKBONES[name](image_size=image_size, **kw)
    except TypeError as e:  # bad keyword for this builder
        raise ConfigError(f"backbone={name!r} does not accept these options {sorted(kw)}: {e}") from e


def check_drop_path(field: str, rate: float, name: str) -> float:
    """`rate` if it is a valid stochastic-depth rate for backbone `name`, else a one-line ConfigError."""
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"{field}={rate!r} must be >= 0 and < 1 (the probability of dropping a residual branch)")
    if rate > 0 and name not in DROP_PATH_BACKBONES:
        raise ConfigError(
            f"{field}={rate!r} is not supported by backbone={name} (no stochastic depth); use {field}=0 or one of: "
            f"{', '.join(DROP_PATH_BACKBONES)}"
        )
    return rate


def _drop_paths(module: nn.Module) -> list[nn.Module]:
    from timm.layers import DropPath

    return [m for m in module.modules() if isinstance(m, DropPath)]


def drop_path_rates(module: nn.Module) -> list[float]:
    """The drop probability of every timm DropPath inside `module` (empty: no stochastic depth)."""
    return [float(m.drop_prob) for m in _drop_paths(module)]


def disable_drop_path(module: nn.Module) -> int:
    """Set every timm DropPath of `module` to drop nothing (in train mode too); returns how many.
    DropPath holds no parameters, so the state dict and the parameter order are unchanged."""
    mods = _drop_paths(module)
    for m in mods:
        m.drop_prob = 0.0
    return len(mods)
