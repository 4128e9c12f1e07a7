"""Segmentation heads registry.

`HEADS` maps a head name to its class (each has `from_backbone(backbone, num_classes,
extra_in_channels=0, **kw)`, `refuse(backbone)`, `needs_intermediates`). Names: linear, setr_naive,
setr_pup, setr_mla, deeplabv3, segformer. Attention fusion lives in `core.models.heads.fusion`.
"""

from __future__ import annotations

from typing import Optional

from core.errors import ConfigError
from core.models.heads.base import SegHead
from core.models.heads.deeplabv3 import DeepLabV3Head
from core.models.heads.fusion import AttentionAffinityFusion, AttentionFeatureFusion, check_fusion, fusion_refusal
from core.models.heads.linear import LinearHead
from core.models.heads.segformer import SegFormerHead
from core.models.heads.setr import SETRMLAHead, SETRNaiveHead, SETRPUPHead

HEADS: dict[str, type[SegHead]] = {
    "linear": LinearHead,
    "setr_naive": SETRNaiveHead,
    "setr_pup": SETRPUPHead,
    "setr_mla": SETRMLAHead,
    "deeplabv3": DeepLabV3Head,
    "segformer": SegFormerHead,
}


def list_heads() -> list[str]:
    return list(HEADS)


def check_head_name(field: str, name: str) -> None:
    if name not in HEADS:
        raise ConfigError(f"{field}={name!r} is not known; choose one of: {', '.join(HEADS)}")


def head_refusal(name: str, backbone) -> Optional[ConfigError]:
    """Why head `name` cannot fit `backbone` (None if it fits)."""
    check_head_name("head", name)
    return HEADS[name].refuse(backbone)


def create_head(name: str, backbone, num_classes: int, extra_in_channels: int = 0, **kw) -> SegHead:
    check_head_name("head", name)
    cls = HEADS[name]
    cls.check(backbone)
    return cls.from_backbone(backbone, num_classes, extra_in_channels=extra_in_channels, **kw)


__all__ = [
    "HEADS", "SegHead", "create_head", "check_head_name", "head_refusal", "list_heads",
    "LinearHead", "SETRNaiveHead", "SETRPUPHead", "SETRMLAHead", "DeepLabV3Head", "SegFormerHead",
    "AttentionFeatureFusion", "AttentionAffinityFusion", "check_fusion", "fusion_refusal",
]
