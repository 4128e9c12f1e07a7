"""Common contract of the segmentation heads.

A head is an `nn.Module` built from a backbone (`from_backbone`) that maps the backbone's dense map
(and, for multi-level heads, a list of intermediate block outputs) to class logits:

    head(dense, intermediates=(), out_size=None) -> (B, num_classes, h', w')

- `needs_intermediates`: block indices the head wants from `Backbone.forward_all` (() when the
  dense map is enough). The `Segmenter` requests exactly these.
- `refuse(backbone) -> ConfigError | None`: why the head cannot fit that backbone (None if it fits);
  `check(backbone)` raises it. `create_head` calls `check` before building.
- `out_size=None` returns the head's native resolution (the patch grid for most heads, the input
  resolution for SETR-PUP, which upsamples inside); otherwise the logits are bilinearly resized to
  `out_size` (only when the sizes differ, so no op is applied when they already match).
- `width_arg`: the constructor argument that sets the width of the head's convolutions
  (`SegmentConfig.head_channels`; e.g. SETR's `channels`, mmseg's 256), or None when the head has no
  such width (linear, torchvision's DeepLabHead with its fixed 256): `width_kwargs(channels)` turns a
  width into constructor kwargs and refuses one for such a head. The one declaration of which heads
  have a width: `create_head` / `build_segmenter` and `SegmentConfig` read it.
- `extra_in_channels`: channels appended to the head's input by attention fusion 1. Single-level
  heads receive them on the dense map; multi-level heads on their last (deepest) level. Use
  `inject(dense, intermediates, extra)` to place them consistently.
"""

from __future__ import annotations

from typing import ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ConfigError


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False), a no-op when the size already matches."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def four_levels(backbone) -> tuple[int, ...]:
    """Four evenly spaced block indices ending at the last block (SETR-MLA's choice).

    ViT with depth D: D//4*(i+1)-1, e.g. (2, 5, 8, 11) for D=12; a 4-stage CNN / Swin with
    num_blocks=4 gives (0, 1, 2, 3) = its four stages. The last index is always forced to D-1 so the
    deepest level is the last block whatever D is.
    """
    d = int(backbone.num_blocks)
    idx = [d // 4 * (i + 1) - 1 for i in range(4)]
    idx[-1] = d - 1
    return tuple(idx)


class SegHead(nn.Module):
    """Base class: see the module docstring for the contract."""

    name: str = "?"
    multi_level: bool = False
    width_arg: ClassVar[Optional[str]] = None
    """Constructor argument setting the width of the head's convolutions (None: the head has none)."""

    def __init__(self) -> None:
        super().__init__()
        self.needs_intermediates: tuple[int, ...] = ()
        self.extra_in_channels: int = 0
        self.num_classes: int = 0

    # ------------------------------------------------------------------ fitting
    @classmethod
    def refuse(cls, backbone) -> Optional[ConfigError]:
        return None

    @classmethod
    def check(cls, backbone) -> None:
        err = cls.refuse(backbone)
        if err is not None:
            raise err

    @classmethod
    def from_backbone(cls, backbone, num_classes: int, extra_in_channels: int = 0, **kw) -> "SegHead":
        raise NotImplementedError

    @classmethod
    def width_kwargs(cls, channels: Optional[int], field: str = "head_channels") -> dict:
        """Constructor kwargs giving the head's convolutions `channels` channels ({} for None: the head's
        reference width); ConfigError when the head declares no width (`width_arg` None)."""
        if channels is None:
            return {}
        if cls.width_arg is None:
            from core.models.heads import heads_with_width  # the registry lists the heads that have one

            raise ConfigError(f"{field}={channels!r} sets the width of the head's convolutions but head={cls.name!r} "
                              f"has no such width; leave {field} unset (none) or choose head="
                              f"{' | '.join(heads_with_width())}")
        return {cls.width_arg: int(channels)}

    # ------------------------------------------------------------------ inputs
    def inject(self, dense: torch.Tensor, intermediates: Sequence[torch.Tensor], extra: Optional[torch.Tensor]):
        """Append fusion-1 channels `extra` (B, E, gh, gw) to the head's input (resized if needed)."""
        intermediates = list(intermediates)
        if extra is None:
            return dense, intermediates
        if self.multi_level:
            last = intermediates[-1]
            intermediates[-1] = torch.cat([last, resize(extra.to(last.dtype), last.shape[-2:])], dim=1)
        else:
            dense = torch.cat([dense, resize(extra.to(dense.dtype), dense.shape[-2:])], dim=1)
        return dense, intermediates

    def forward(self, dense: torch.Tensor, intermediates: Sequence[torch.Tensor] = (), out_size=None) -> torch.Tensor:
        logits = self.decode(dense, list(intermediates))
        return logits if out_size is None else resize(logits, out_size)

    def decode(self, dense: torch.Tensor, intermediates: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


def conv_bn_relu(cin: int, cout: int, k: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def need_blocks(head: str, backbone, n: int = 4) -> Optional[ConfigError]:
    nb = int(getattr(backbone, "num_blocks", 0) or 0)
    if nb < n:
        return ConfigError(
            f"head='{head}' needs {n} block outputs but backbone {backbone.name} has {nb} blocks; "
            f"choose head=linear, setr_naive, setr_pup or deeplabv3, or a deeper backbone"
        )
    return None


class FourLevelHead(SegHead):
    """A head over four block outputs (SETR-MLA, SegFormer): picks them with `four_levels` and
    refuses backbones with fewer than four blocks. Subclasses take (dims, num_classes, levels,
    extra_in_channels, **kw)."""

    multi_level = True

    @classmethod
    def refuse(cls, backbone) -> Optional[ConfigError]:
        return need_blocks(cls.name, backbone)

    @classmethod
    def from_backbone(cls, backbone, num_classes, extra_in_channels=0, **kw):
        levels = four_levels(backbone)
        return cls(list(backbone.intermediate_dims(levels)), num_classes, levels, extra_in_channels, **kw)
