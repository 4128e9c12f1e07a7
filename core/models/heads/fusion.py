"""Attention fusion: the study's own ways of feeding a transformer's (ViT / Swin) self-attention to a
segmentation head.

Seed: Apavou & Zucker, "Barlow Twins with Vision Transformers for semantic segmentation" (the study
is described in README.md; what the fusions did in the smoke study is in docs/findings.md).
CLS-attention maps follow DINO's visualisation (Caron et al., arXiv:2104.14294); propagating
predictions along an attention affinity follows the random-walk refinement of affinity-based
segmentation (Ahn & Kwak, "Learning Pixel-level Semantic Affinity with Image-level Supervision",
CVPR 2018, arXiv:1803.10464) with the transformer's own attention as the transition matrix.

Fusion 1, `AttentionFeatureFusion` ("attention as features")
    From the last K blocks' attentions (B, heads, T, T) take the CLS-to-patch rows
    attn[:, :, 0, prefix:] -> (B, heads, gh, gw) (prefix = T - gh*gw: CLS + register/dist tokens).
    Each map is normalised by its maximum over the grid (attention is >= 0, so maps lie in [0, 1]
    with max exactly 1; chosen over min-max because min-max turns an almost uniform map into
    amplified noise). The heads*K maps are concatenated to the dense features as extra channels at
    the base head's input (`SegHead.inject`). On Swin (no CLS token) the maps are the attention each
    token receives in the last block (see "Swin" below), normalised the same way.

Fusion 2, `AttentionAffinityFusion` ("attention as affinity")
    A = last block's attention averaged over heads, patch-to-patch part (prefix rows/columns dropped)
    and renormalised so each row sums to 1 (row-stochastic). Coarse logits L (B, K, gh, gw) on the
    patch grid, flattened to (B, N, K), are propagated t steps:  L <- (1 - a) L + a A L,  then
    bilinearly upsampled to the input size. a = sigmoid(alpha_logit) is learnable, initialised
    from `alpha`, which callers must pass (its one default is `SegmentConfig.fusion_alpha` in
    core/config.py); an initial value of exactly 0 or 1 (or learnable=False) keeps a fixed
    (a = 0 gives exactly the plain head). If the base head's native output is finer than the patch
    grid (SETR-PUP upsamples inside the head), L is its average-pool to the grid and the
    propagation is added as a residual: out = head_out + up(L_t - L), so fine detail is kept and
    a = 0 still gives exactly the plain head.

Which backbones: a ViT with a CLS token and global attention, or a Swin (windowed attention, no CLS
token; core/models/backbones/swin.py gives the last stage's last block as a (B, heads, N, N) matrix over
the N = h*w tokens of the stage, block-diagonal per window, rows summing to 1). A CNN has no
attention: ConfigError (one line).

Swin (documented choices):
- fusion 1 has no CLS row to read, so each head's map is the attention RECEIVED per token: the mean of
  the token's column over the queries of its window (`core.models.backbones.swin.received_attention_maps`,
  the same function as `SwinBackbone.attention_saliency`), max-normalised like the ViT maps. Only the
  last stage's last block is read: `fusion_blocks` must be 1 (other stages have other grids and heads).
- fusion 2 uses that block-diagonal matrix as A (head-averaged, renormalised: `patch_affinity` with no
  prefix tokens); a shifted block's windows are mapped back to real token positions (the roll undone).
  One step then mixes logits within a window only. For swin_tiny at 224 px (7x7 map, 7x7 window) and
  swin_nano at 64 px (2x2 map, 2x2 window) the window covers the whole map, so A is image-wide as on a
  ViT; at larger inputs (swin_tiny at 512 px: a 16x16 map in 7x7 windows, no shift in that stage) the
  propagation stays inside each window. a = 0 still gives exactly the plain head.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ConfigError
from core.models.backbones.swin import received_attention_maps
from core.models.heads.base import resize

FUSION_NAMES = ("none", "features", "affinity")


def attention_kind(backbone) -> Optional[str]:
    """"cls" (ViT: CLS token, global attention), "window" (Swin: `attention_kind = "window"`) or None."""
    kind = getattr(backbone, "attention_kind", None)
    if kind is not None:
        return str(kind)
    if getattr(backbone, "is_transformer", False) and getattr(backbone, "has_cls_token", False):
        return "cls"
    return None


def fusion_refusal(fusion: str, backbone, blocks: int = 1) -> Optional[ConfigError]:
    """Why `fusion` cannot run on `backbone` (None if it can)."""
    name = getattr(backbone, "name", type(backbone).__name__)
    if fusion in (None, "none"):
        return None
    if fusion not in FUSION_NAMES:
        return ConfigError(f"fusion={fusion!r} is not known; choose one of: {', '.join(FUSION_NAMES)}")
    if not getattr(backbone, "is_transformer", False):
        return ConfigError(
            f"fusion='{fusion}' needs a transformer backbone with self-attention; {name} is a CNN "
            f"— use fusion=none or a vit_* backbone"
        )
    kind = attention_kind(backbone)
    if kind is None:
        return ConfigError(
            f"fusion='{fusion}' needs a ViT with a CLS token or a Swin with window attention; {name} has neither "
            f"— use fusion=none or a vit_* / swin_* backbone"
        )
    if kind == "window" and fusion == "features" and blocks != 1:
        return ConfigError(
            f"fusion_blocks={blocks}: fusion 1 on {name} reads the last stage's last block only (Swin's stages have "
            f"different grids and heads); use fusion_blocks=1"
        )
    nb = int(getattr(backbone, "num_blocks", 0) or 0)
    if fusion == "features" and not (1 <= blocks <= nb):
        return ConfigError(f"fusion_blocks={blocks} must be between 1 and the {nb} blocks of {name}")
    return None


def check_fusion(fusion: str, backbone, blocks: int = 1) -> None:
    err = fusion_refusal(fusion, backbone, blocks)
    if err is not None:
        raise err


def _prefix(attn: torch.Tensor, grid: Sequence[int]) -> int:
    gh, gw = int(grid[0]), int(grid[1])
    prefix = attn.shape[-1] - gh * gw
    if prefix < 0:
        raise ValueError(f"attention has {attn.shape[-1]} tokens, fewer than the {gh}x{gw} patch grid")
    return prefix


def cls_attention_maps(attn: torch.Tensor, grid: Sequence[int], eps: float = 1e-12) -> torch.Tensor:
    """(B, heads, T, T) -> max-normalised CLS-to-patch maps (B, heads, gh, gw)."""
    gh, gw = int(grid[0]), int(grid[1])
    p = _prefix(attn, grid)
    if p < 1:
        raise ValueError("CLS-to-patch attention needs a CLS token (prefix of at least 1 token)")
    maps = attn[:, :, 0, p:].reshape(attn.shape[0], attn.shape[1], gh, gw)
    return max_normalize(maps, eps)


def patch_affinity(attn: torch.Tensor, grid: Sequence[int], eps: float = 1e-12) -> torch.Tensor:
    """(B, heads, T, T) -> head-averaged, row-stochastic patch-to-patch matrix (B, N, N)."""
    p = _prefix(attn, grid)
    a = attn.mean(dim=1)[:, p:, p:]
    return a / a.sum(dim=-1, keepdim=True).clamp_min(eps)


def propagate(logits: torch.Tensor, affinity: torch.Tensor, alpha, steps: int) -> torch.Tensor:
    """t steps of L <- (1 - a) L + a A L on the flattened grid. logits (B,K,gh,gw), affinity (B,N,N)."""
    b, k, gh, gw = logits.shape
    lf = logits.flatten(2).transpose(1, 2)  # (B, N, K)
    a = alpha.to(lf.dtype) if torch.is_tensor(alpha) else torch.tensor(float(alpha), dtype=lf.dtype, device=lf.device)
    aff = affinity.to(lf.dtype)
    for _ in range(int(steps)):
        lf = (1 - a) * lf + a * torch.bmm(aff, lf)
    return lf.transpose(1, 2).reshape(b, k, gh, gw)


def max_normalize(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(B, heads, gh, gw) non-negative maps divided by their maximum over the grid (max exactly 1)."""
    return maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(eps)


class AttentionFeatureFusion(nn.Module):
    """Fusion 1: CLS-to-patch attention of the last K blocks as heads*K extra head-input channels
    (Swin: the attention received per token in the last block, `window` / `shift` of that block)."""

    kind = "features"

    def __init__(self, num_heads: int, attention_blocks: Sequence[int], *,
                 window: Optional[Sequence[int]] = None, shift: Optional[Sequence[int]] = None):
        super().__init__()
        self.num_heads = int(num_heads)
        self.attention_blocks = tuple(int(b) for b in attention_blocks)
        self.out_channels = self.num_heads * len(self.attention_blocks)
        self.window = tuple(int(v) for v in window) if window is not None else None
        self.shift = tuple(int(v) for v in (shift if shift is not None else (0, 0))) if window is not None else None
        if self.window is not None and len(self.attention_blocks) != 1:
            raise ConfigError("fusion 1 on a Swin reads one block (the last stage's last); use fusion_blocks=1")

    @classmethod
    def from_backbone(cls, backbone, blocks: int = 1) -> "AttentionFeatureFusion":
        check_fusion("features", backbone, blocks)
        nb = int(backbone.num_blocks)
        if attention_kind(backbone) == "window":
            window, shift = backbone.attention_window(-1)
            return cls(backbone.num_heads, (nb - 1,), window=window, shift=shift)
        return cls(backbone.num_heads, tuple(range(nb - blocks, nb)))

    def forward(self, attentions: Mapping[int, torch.Tensor], grid: Sequence[int]) -> torch.Tensor:
        if self.window is not None:
            maps = [max_normalize(received_attention_maps(attentions[b], grid, self.window, self.shift))
                    for b in self.attention_blocks]
        else:
            maps = [cls_attention_maps(attentions[b], grid) for b in self.attention_blocks]
        return torch.cat(maps, dim=1)

    def extra_repr(self) -> str:
        maps = "cls" if self.window is None else f"received(window={self.window}, shift={self.shift})"
        return f"blocks={self.attention_blocks}, out_channels={self.out_channels}, maps={maps}, norm=max"


class AttentionAffinityFusion(nn.Module):
    """Fusion 2: propagate coarse logits along the last block's row-stochastic patch attention."""

    kind = "affinity"

    def __init__(self, attention_block: int, steps: int = 2, *, alpha: float, learnable: bool = True):
        super().__init__()
        if not 0.0 <= float(alpha) <= 1.0:
            raise ConfigError(f"fusion_alpha={alpha} must be between 0 and 1")
        if int(steps) < 0:
            raise ConfigError(f"fusion_steps={steps} must be >= 0")
        self.attention_blocks = (int(attention_block),)
        self.steps = int(steps)
        alpha = float(alpha)
        if learnable and 0.0 < alpha < 1.0:
            self.alpha_logit = nn.Parameter(torch.tensor(math.log(alpha / (1.0 - alpha))))
            self.register_buffer("alpha_fixed", None)
        else:  # boundary values (0 = plain head, 1 = pure propagation) are kept exactly
            self.alpha_logit = None
            self.register_buffer("alpha_fixed", torch.tensor(alpha))

    @classmethod
    def from_backbone(cls, backbone, steps: int = 2, *, alpha: float, learnable: bool = True):
        check_fusion("affinity", backbone)
        return cls(int(backbone.num_blocks) - 1, steps, alpha=alpha, learnable=learnable)

    @property
    def alpha(self) -> torch.Tensor:
        if self.alpha_logit is not None:
            return torch.sigmoid(self.alpha_logit)
        return self.alpha_fixed

    def forward(self, logits: torch.Tensor, attentions: Mapping[int, torch.Tensor], grid: Sequence[int],
                out_size: Sequence[int], alpha=None) -> torch.Tensor:
        grid = (int(grid[0]), int(grid[1]))
        a = self.alpha if alpha is None else alpha
        aff = patch_affinity(attentions[self.attention_blocks[0]], grid)
        if tuple(logits.shape[-2:]) == grid:
            return resize(propagate(logits, aff, a, self.steps), out_size)
        coarse = F.adaptive_avg_pool2d(logits, grid)
        delta = propagate(coarse, aff, a, self.steps) - coarse
        return resize(logits, out_size) + resize(delta, out_size)

    def extra_repr(self) -> str:
        return f"block={self.attention_blocks[0]}, steps={self.steps}, learnable={self.alpha_logit is not None}"
