"""Segmentation heads registry.

`HEADS` maps a head name to its class (each has `from_backbone(backbone, num_classes,
extra_in_channels=0, **kw)`, `refuse(backbone)`, `needs_intermediates`, `width_arg`: the constructor
argument of its convolutions' width, `SegmentConfig.head_channels`, or None). Names: linear, setr_naive,
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


def heads_with_width() -> list[str]:
    """Heads whose convolution width can be set (`SegHead.width_arg`; `SegmentConfig.head_channels`)."""
    return [n for n, cls in HEADS.items() if cls.width_arg is not None]


def check_head_channels(field: str, head: str, channels: Optional[int]) -> None:
    """`head` is known and `channels` (None, or a positive int) fits it: ConfigError otherwise."""
    check_head_name("head", head)
    if channels is None:
        return
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ConfigError(f"{field}={channels!r} is not allowed; choose a positive integer (the channels of the head's "
                          f"convolutions) or none (the head's reference width, mmseg: 256)")
    HEADS[head].width_kwargs(channels, field)


def create_head(name: str, backbone, num_classes: int, extra_in_channels: int = 0,
                head_channels: Optional[int] = None, **kw) -> SegHead:
    """Head `name` for `backbone`; `head_channels`: the width of its convolutions (`SegmentConfig.head_channels`;
    None: the head's own default), refused for a head without one (`SegHead.width_arg`). `kw` go to the head's
    constructor (an explicit width argument there wins)."""
    check_head_channels("head_channels", name, head_channels)
    cls = HEADS[name]
    cls.check(backbone)
    kw = {**cls.width_kwargs(head_channels), **kw}
    return cls.from_backbone(backbone, num_classes, extra_in_channels=extra_in_channels, **kw)


__all__ = [
    "HEADS", "SegHead", "create_head", "check_head_name", "check_head_channels", "head_refusal", "heads_with_width",
    "list_heads",
    "LinearHead", "SETRNaiveHead", "SETRPUPHead", "SETRMLAHead", "DeepLabV3Head", "SegFormerHead",
    "AttentionFeatureFusion", "AttentionAffinityFusion", "check_fusion", "fusion_refusal",
]
