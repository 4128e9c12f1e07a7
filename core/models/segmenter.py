"""Segmenter: backbone + segmentation head (+ optional attention fusion) -> logits at input size.

`Segmenter(backbone, head, fusion=None, num_classes=None, frozen=False)`:
    forward(x) -> (B, num_classes, H, W). It asks `backbone.forward_all` for the intermediate blocks
    the head declares (`head.needs_intermediates`) and for attention weights only when a fusion
    module needs them (`fusion.attention_blocks`), so plain runs keep fused attention.
    - fusion 1 (`AttentionFeatureFusion`): CLS maps (Swin: the attention each token receives) appended to
      the head input (`head.inject`);
    - fusion 2 (`AttentionAffinityFusion`): the head's native logits are propagated on the patch
      grid, then upsampled;
    - none: the head's logits bilinearly upsampled to the input size.
Auxiliary heads (`aux_heads`, an `nn.ModuleList` or None; SETR-PUP's deep supervision,
`core.models.heads.setr.SETRUPAuxHead`, `SegmentConfig.aux_heads`): `forward(x, with_aux=True)` also asks
`forward_all` for their blocks (`aux_blocks`) and returns ``(logits, [aux logits at the input size])``;
plain `forward(x)` (validation, `whole_inference` / `slide_inference`, model.pt predictions) never runs
them, so the main head's output is the same with or without them.
Frozen mode: backbone parameters have requires_grad=False, the backbone stays in eval mode
(BatchNorm statistics / dropout untouched) whatever `.train()` says, and it runs under no_grad.

`build_segmenter(cfg, num_classes, backbone=None)` builds all three from a `SegmentConfig`
(weights are loaded by the caller, e.g. `core.weights.load_source`, before or after building);
`cfg.head_channels` sets the width of the head's (and the auxiliary heads') convolutions.
`param_groups(lr, backbone_lr_scale, weight_decay, gate_lr)` gives optimizer groups (no weight decay
on biases, norm parameters and scalars; fusion 2's mixing logit in its own group at `gate_lr`).
`whole_inference` / `slide_inference`: evaluation-time prediction over a whole image or with
overlapping sliding windows (mmsegmentation's slide mode: windows averaged, a window never larger
than the image, each padded to the patch multiple); `slide_window(cfg, size_multiple)`: the (crop,
stride) a SegmentConfig asks for.
Evaluation runs them on the image resized keeping its aspect ratio (any h x w, e.g. 512 x 683), and
the caller resizes the logits to the original mask (core/methods/segmentation.py).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ConfigError
from core.models.heads import create_head
from core.models.heads.base import SegHead, resize
from core.models.heads.fusion import AttentionAffinityFusion, AttentionFeatureFusion, check_fusion


class Segmenter(nn.Module):
    def __init__(self, backbone: nn.Module, head: SegHead, fusion: Optional[nn.Module] = None,
                 num_classes: Optional[int] = None, frozen: bool = False,
                 aux_heads: Optional[Sequence[SegHead]] = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.fusion = fusion
        self.aux_heads = nn.ModuleList(aux_heads) if aux_heads else None
        self.num_classes = int(num_classes if num_classes is not None else head.num_classes)
        if head.num_classes and head.num_classes != self.num_classes:
            raise ConfigError(f"num_classes={self.num_classes} does not match the head's {head.num_classes} classes")
        if isinstance(fusion, AttentionFeatureFusion) and head.extra_in_channels != fusion.out_channels:
            raise ConfigError(
                f"fusion='features' adds {fusion.out_channels} channels but the head was built with "
                f"extra_in_channels={head.extra_in_channels}; build the head with extra_in_channels={fusion.out_channels}"
            )
        self.frozen = False
        if frozen:
            self.freeze_backbone()

    # ------------------------------------------------------------------ modes
    def freeze_backbone(self) -> None:
        self.frozen = True
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    @property
    def aux_blocks(self) -> tuple[int, ...]:
        """Blocks the auxiliary heads read (one per head, in order); () without auxiliary heads."""
        if self.aux_heads is None:
            return ()
        return tuple(int(h.needs_intermediates[0]) for h in self.aux_heads)

    @property
    def attention_blocks(self) -> tuple[int, ...]:
        return tuple(getattr(self.fusion, "attention_blocks", ())) if self.fusion is not None else ()

    # ------------------------------------------------------------------ forward
    def _features(self, x: torch.Tensor, extra_blocks: tuple[int, ...] = ()):
        ctx = torch.no_grad() if (self.frozen and not x.requires_grad) else contextlib.nullcontext()
        with ctx:
            return self.backbone.forward_all(
                x, intermediates=tuple(self.head.needs_intermediates) + tuple(extra_blocks),
                attention_blocks=self.attention_blocks
            )

    def forward(self, x: torch.Tensor, alpha=None, with_aux: bool = False):
        """x (B, 3, H, W) -> logits (B, num_classes, H, W). `alpha` overrides fusion 2's a.
        `with_aux=True` (training): ``(logits, [aux logits (B, num_classes, H, W) per auxiliary head])``
        (an empty list without auxiliary heads)."""
        out_size = tuple(x.shape[-2:])
        check = getattr(self.backbone, "check_input_size", None)
        if check is not None:
            check(*out_size)
        aux_blocks = self.aux_blocks if with_aux else ()
        feats = self._features(x, aux_blocks)
        dense, inters = feats.dense, list(feats.intermediates)
        if aux_blocks:
            n = len(inters) - len(aux_blocks)
            inters, aux_in = inters[:n], inters[n:]
        grid = tuple(dense.shape[-2:])
        if isinstance(self.fusion, AttentionFeatureFusion):
            extra = self.fusion(feats.attentions, grid)
            dense, inters = self.head.inject(dense, inters, extra)
            logits = self.head(dense, inters, out_size=out_size)
        elif isinstance(self.fusion, AttentionAffinityFusion):
            logits = self.head(dense, inters, out_size=None)
            logits = self.fusion(logits, feats.attentions, grid, out_size, alpha=alpha)
        else:
            logits = self.head(dense, inters, out_size=out_size)
        if not with_aux:
            return logits
        aux = [h(dense, [f], out_size=out_size) for h, f in zip(self.aux_heads or (), aux_in if aux_blocks else ())]
        return logits, aux

    # ------------------------------------------------------------------ optimisation
    def param_groups(self, lr: float, backbone_lr_scale: float = 0.1, weight_decay: float = 0.0,
                     gate_lr: Optional[float] = None) -> list[dict]:
        """Optimizer groups: head+fusion at `lr`, backbone at lr*scale (skipped when frozen or scale 0);
        biases, norm weights and 0/1-D parameters get no weight decay. Fusion 2's mixing logit gets
        its own group ("fusion_gate") at `gate_lr` (default `lr`), without weight decay."""

        def split(module: nn.Module, prefix: str):
            decay, no_decay = [], []
            for n, p in module.named_parameters():
                if not p.requires_grad:
                    continue
                (no_decay if p.ndim <= 1 or n.endswith(".bias") else decay).append(p)
            return decay, no_decay

        groups: list[dict] = []

        def add(name, params, g_lr, wd):
            if params:
                groups.append({"name": name, "params": params, "lr": g_lr, "weight_decay": wd})

        hd, hn = split(self.head, "head")
        if self.aux_heads is not None:  # auxiliary heads train like the head
            ad, an = split(self.aux_heads, "aux_heads")
            hd, hn = hd + ad, hn + an
        gate = getattr(self.fusion, "alpha_logit", None)
        gate = [gate] if isinstance(gate, nn.Parameter) and gate.requires_grad else []
        if self.fusion is not None:
            fd, fn = split(self.fusion, "fusion")
            hd, hn = hd + fd, hn + [p for p in fn if not any(p is g for g in gate)]
        add("head", hd, lr, weight_decay)
        add("head_no_decay", hn, lr, 0.0)
        add("fusion_gate", gate, lr if gate_lr is None else gate_lr, 0.0)
        if not self.frozen and backbone_lr_scale > 0:
            bd, bn = split(self.backbone, "backbone")
            add("backbone", bd, lr * backbone_lr_scale, weight_decay)
            add("backbone_no_decay", bn, lr * backbone_lr_scale, 0.0)
        return groups


def build_segmenter(cfg, num_classes: int, backbone: Optional[nn.Module] = None, **head_kw) -> Segmenter:
    """Segmenter from a `core.config.SegmentConfig` (fusion / head refusals raise ConfigError early)."""
    if backbone is None:
        from core.models.registry import create_backbone

        backbone = create_backbone(cfg.backbone, image_size=cfg.data.image_size)
    fusion: Optional[nn.Module] = None
    extra = 0
    if cfg.fusion == "features":
        fusion = AttentionFeatureFusion.from_backbone(backbone, blocks=cfg.fusion_blocks)
        extra = fusion.out_channels
    elif cfg.fusion == "affinity":
        fusion = AttentionAffinityFusion.from_backbone(backbone, steps=cfg.fusion_steps, alpha=cfg.fusion_alpha)
    else:
        check_fusion(cfg.fusion, backbone)
    channels = getattr(cfg, "head_channels", None)
    if getattr(cfg, "head_input_norm", False):
        head_kw = {"input_norm": True, **head_kw}
    head = create_head(cfg.head, backbone, num_classes, extra_in_channels=extra, head_channels=channels, **head_kw)
    aux = None
    if getattr(cfg, "aux_heads", False):
        from core.models.heads.setr import SETRUPAuxHead, aux_heads_refusal

        err = aux_heads_refusal(cfg.head, backbone)
        if err is not None:
            raise err
        aux = SETRUPAuxHead.for_backbone(backbone, num_classes, **SETRUPAuxHead.width_kwargs(channels))
    return Segmenter(backbone, head, fusion, num_classes=num_classes, frozen=(cfg.mode == "frozen"), aux_heads=aux)


# ---------------------------------------------------------------------- inference
def _pair(v: Union[int, Sequence[int]]) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    return int(v[0]), int(v[1])


def slide_window(cfg, size_multiple: Optional[int] = None) -> tuple[int, int]:
    """(crop, stride) of sliding-window inference for a `SegmentConfig`.

    crop: ``cfg.slide_crop``, or the evaluation short side (``eval_scale``, else ``data.image_size``)
    rounded down to `size_multiple` (the backbone's patch multiple; an explicit crop must already be
    one, `core.runs.segment.check_fit`); stride: ``cfg.slide_stride``, or 2/3 of the crop. mmseg runs
    crop 512, stride 341 on images resized to short side 512 (open-mmlab/mmsegmentation
    configs/setr/setr_vit-l_pup_8xb2-160k_ade20k-512x512.py: ``test_cfg=dict(mode='slide',
    crop_size=(512, 512), stride=(341, 341))``): one window row over the short side, windows every
    2/3 crop along the long side."""
    if cfg.slide_crop is not None:
        crop = int(cfg.slide_crop)
    else:
        crop = int(cfg.eval_short_side())
        if size_multiple:
            crop = max(int(size_multiple), crop // int(size_multiple) * int(size_multiple))
    stride = int(cfg.slide_stride) if cfg.slide_stride is not None else max(1, crop * 2 // 3)
    return crop, stride


@torch.no_grad()
def whole_inference(model: nn.Module, image: torch.Tensor, size_divisor: Optional[int] = None) -> torch.Tensor:
    """Logits (B, K, H, W) for the whole image; pads bottom/right with 0 to a multiple of `size_divisor`
    (e.g. the patch size) when given, then crops back (mmseg pads the normalised image with 0 to its
    ``size_divisor`` and removes the padding before resizing to the original size)."""
    h, w = image.shape[-2:]
    x = image
    if size_divisor:
        ph, pw = (-h) % size_divisor, (-w) % size_divisor
        if ph or pw:
            x = F.pad(image, (0, pw, 0, ph))
    out = model(x)
    out = resize(out, x.shape[-2:])
    return out[..., :h, :w]


@torch.no_grad()
def slide_inference(model: nn.Module, image: torch.Tensor, crop: Union[int, Sequence[int]],
                    stride: Union[int, Sequence[int]], num_classes: int,
                    size_divisor: Optional[int] = None) -> torch.Tensor:
    """Sliding-window logits (B, num_classes, H, W): windows of `crop` every `stride` pixels (the last
    window flush with the border), logits of overlapping windows averaged, as mmseg
    (open-mmlab/mmsegmentation mmseg/models/segmentors/encoder_decoder.py `slide_inference`: the same
    grid, ``y1 = max(y2 - h_crop, 0)``). A window is never larger than the image: on a side shorter than
    the crop (e.g. the short side of a non-square image) the window is the whole side ("the small patch
    will be used to decode without padding", mmseg), so a crop covering the image gives exactly
    `whole_inference`. Each window goes through `whole_inference` (padded to `size_divisor`, e.g. the
    patch size, and cropped back). Needs 0 < stride <= crop (no gaps)."""
    ch, cw = _pair(crop)
    sh, sw = _pair(stride)
    if sh <= 0 or sw <= 0 or ch <= 0 or cw <= 0 or sh > ch or sw > cw:
        raise ConfigError(f"slide inference needs 0 < stride <= crop, got crop={crop} stride={stride}")
    b, _, H, W = image.shape
    preds = image.new_zeros((b, num_classes, H, W))
    count = image.new_zeros((1, 1, H, W))
    ny = max(H - ch + sh - 1, 0) // sh + 1
    nx = max(W - cw + sw - 1, 0) // sw + 1
    for iy in range(ny):
        for ix in range(nx):
            y2, x2 = min(iy * sh + ch, H), min(ix * sw + cw, W)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            out = whole_inference(model, image[:, :, y1:y2, x1:x2], size_divisor=size_divisor)
            preds[:, :, y1:y2, x1:x2] += out.to(preds.dtype)
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count
