"""Backbone registry: names -> builder functions (nothing is eval'ed).

`create_backbone(name, image_size=224, **kw)`, `list_backbones()`, `check_backbone_name(field, name)`.
"""

from __future__ import annotations

from typing import Callable

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
