"""timm Swin Transformer backbones: `swin_tiny` (swin_tiny_patch4_window7_224) and `swin_nano`
(a small timm SwinTransformer for CPU: patch 4, window 4, embed 48, depths (2, 2, 2, 2), heads
(3, 6, 12, 24); at 64 px the stage grids are 16, 8, 4, 2 and the last stage's window clamps to 2).

The library model is always built at its native size (224 for swin_tiny, 64 for swin_nano) with
``dynamic_img_size=True``, so its relative-position tables match the pretrained weights whatever
``image_size`` is; inputs of any multiple of 32 px run (window attention pads / masks per input).
timm fixes each block's window and shift when the model is built (a stage whose native grid is not
larger than the window gets the grid as window and no shift: swin_tiny's last stage 7x7 window and
swin_nano's last stage 2x2 window, both unshifted); a larger input is padded at the bottom / right to
a multiple of the window (the padded tokens are not masked by timm).

- pooled: average of the last stage after the final norm (timm's ``global_pool='avg'``);
- dense: last stage after the final norm, NHWC -> NCHW (stride 32);
- intermediates: outputs of stages 0..3 (NCHW, strides 4, 8, 16, 32);
- attention (``forward_all(..., attention_blocks=...)``): indices are STAGES (as for intermediates,
  negative allowed); for stage i it returns the attention of the stage's LAST block as a
  patch-to-patch matrix ``(B, heads_i, N_i, N_i)`` over the stage's N_i = h_i * w_i tokens in
  row-major order (no prefix tokens). It is recomputed by hooks on timm's `WindowAttention` (timm
  files untouched, training keeps fused attention): ``softmax(q k^T * scale + relative position
  bias + shift mask)`` from the module's own ``qkv`` on the windows it saw, the shift mask taken as
  -inf (timm adds -100, i.e. a weight of e^-100 ~ 4e-44: the same up to float rounding), then each
  window is scattered back to the real token positions (the cyclic roll undone), so the matrix is
  block-diagonal per window of that block (per shifted window and mask region for a shifted block),
  exactly 0 outside. Keys on padding are dropped and each row renormalised to sum to 1 (the same as
  masking the padding; without padding it is exactly timm's attention). `window_layout` gives the
  window / region of each token, `received_attention_maps` the attention each token receives.
- attention_saliency: there is no CLS token, so the per-head map of the last block is the attention
  RECEIVED per token: the mean of its column over the queries of its window (`received_attention_maps`),
  (B, heads, h, w); the same function feeds fusion 1 (core/models/heads/fusion.py).
Swin-specific ConfigError: none besides the size multiple of 32.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence

import timm
import torch
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, WindowAttention
from torch import nn

from core.models.backbones.base import Backbone, BackboneOutput

SWIN_ARCHS = {
    "swin_tiny": ("swin_tiny_patch4_window7_224", None, 224),
    "swin_nano": ("swin_nano", dict(patch_size=4, window_size=4, embed_dim=48, depths=(2, 2, 2, 2),
                                    num_heads=(3, 6, 12, 24)), 64),
}


# ---------------------------------------------------------------------- window attention
def window_attention_probs(attn: WindowAttention, x_windows: torch.Tensor,
                           mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B*nW, heads, wa, wa) attention of a timm `WindowAttention` for its window tokens `x_windows`
    (B*nW, wa, C), recomputed as timm's non-fused path: softmax(q k^T * scale + relative position bias
    [+ mask]); the shift mask (nW, wa, wa; 0 / -100 in timm) is applied as -inf, so masked pairs are 0."""
    b_, n, _ = x_windows.shape
    heads = attn.num_heads
    qkv = attn.qkv(x_windows).reshape(b_, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    scores = ((q * attn.scale) @ k.transpose(-2, -1)).float() + attn._get_rel_pos_bias().float()
    if mask is not None:
        nw = mask.shape[0]
        scores = scores.view(-1, nw, heads, n, n).masked_fill(mask.view(1, nw, 1, n, n) != 0, float("-inf"))
        scores = scores.view(-1, heads, n, n)
    return scores.softmax(dim=-1).to(x_windows.dtype)


def window_layout(h: int, w: int, window_size: Sequence[int], shift_size: Sequence[int],
                  device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the tokens of an (h, w) map go in a Swin block's windows, as timm's `SwinTransformerBlock._attn`
    lays them out (roll by -shift, pad bottom/right to the window multiple, `window_partition`).

    Returns ``index`` (nW, wa): the real token (row-major ``y * w + x`` in the UN-shifted map) at each
    window position, -1 on padding; ``group`` (nW, wa): window id * 9 + shift-mask region (the regions of
    timm's `get_attn_mask` on the padded shifted map), so two tokens attend to each other iff they share
    a group."""
    wh, ww = int(window_size[0]), int(window_size[1])
    sh, sw = int(shift_size[0]), int(shift_size[1])
    hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
    i = torch.arange(hp, device=device)[:, None].expand(hp, wp)
    j = torch.arange(wp, device=device)[None, :].expand(hp, wp)
    real = (i < h) & (j < w)
    index = torch.where(real, ((i + sh) % h) * w + (j + sw) % w, torch.full_like(i, -1))

    def region(c, size, win, s):
        if not any((sh, sw)) or s == 0:  # timm: no mask, or the last slice (-0:) covers the whole side
            return torch.zeros_like(c)
        return (c >= size - win).long() + (c >= size - s).long()

    window_id = (i // wh) * (wp // ww) + j // ww
    group = window_id * 9 + region(i, hp, wh, sh) * 3 + region(j, wp, ww, sw)

    def partition(t):
        return t.reshape(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)

    return partition(index), partition(group)


def token_groups(h: int, w: int, window_size: Sequence[int], shift_size: Sequence[int], device=None) -> torch.Tensor:
    """(h*w,) group id of each real token (row-major): tokens attend to each other iff equal ids."""
    index, group = window_layout(h, w, window_size, shift_size, device=device)
    out = torch.empty(h * w, dtype=torch.long, device=device)
    valid = index >= 0
    out[index[valid]] = group[valid]
    return out


def scatter_windows(probs: torch.Tensor, index: torch.Tensor, num_tokens: int,
                    renormalize: bool = True, eps: float = 1e-12) -> torch.Tensor:
    """Per-window attention (B*nW, heads, wa, wa) + `window_layout` index (nW, wa) -> (B, heads, N, N)
    over the real tokens (0 outside the windows); padded keys dropped, rows renormalised when asked."""
    nw, wa = index.shape
    heads = probs.shape[1]
    b = probs.shape[0] // nw
    p = probs.reshape(b, nw, heads, wa, wa).permute(0, 2, 1, 3, 4)  # (B, heads, nW, wa, wa)
    q = index[:, :, None].expand(nw, wa, wa)
    k = index[:, None, :].expand(nw, wa, wa)
    valid = (q >= 0) & (k >= 0)
    flat = (q * num_tokens + k)[valid]
    vals = p[..., valid]  # (B, heads, M)
    out = p.new_zeros(b, heads, num_tokens * num_tokens).scatter(-1, flat.expand(b, heads, -1), vals)
    out = out.view(b, heads, num_tokens, num_tokens)
    if renormalize:
        out = out / out.sum(dim=-1, keepdim=True).clamp_min(eps)
    return out


@contextlib.contextmanager
def capture_window_attention(blocks: dict, renormalize: bool = True) -> Iterator[dict]:
    """Hook timm `SwinTransformerBlock`s ({key: block}) for one pass; yields {key: (B, heads, N, N)}
    (see the module docstring). A pre-hook on the block reads its (h, w); a hook on its `WindowAttention`
    recomputes the window softmax from the windows and mask timm passed it."""
    store: dict = {}
    hw: dict = {}
    handles = []

    def pre(key):
        def hook(module, args):
            hw[key] = (int(args[0].shape[1]), int(args[0].shape[2]))
        return hook

    def post(key, block):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["x"]
            mask = args[1] if len(args) > 1 else kwargs.get("mask")
            h, w = hw[key]
            index, _ = window_layout(h, w, block.window_size, block.shift_size, device=x.device)
            store[key] = scatter_windows(window_attention_probs(module, x, mask), index, h * w, renormalize)
        return hook

    try:
        for key, block in blocks.items():
            handles.append(block.register_forward_pre_hook(pre(key)))
            handles.append(block.attn.register_forward_hook(post(key, block), with_kwargs=True))
        yield store
    finally:
        for hd in handles:
            hd.remove()


def received_attention_maps(attn: torch.Tensor, grid: Sequence[int], window_size: Sequence[int],
                            shift_size: Sequence[int]) -> torch.Tensor:
    """Attention RECEIVED per token: (B, heads, N, N) Swin attention -> (B, heads, gh, gw), each token's
    column averaged over the queries of its window group (`token_groups`), in [0, 1] (not normalised)."""
    gh, gw = int(grid[0]), int(grid[1])
    groups = token_groups(gh, gw, window_size, shift_size, device=attn.device)
    counts = torch.bincount(groups)[groups].to(attn.dtype)  # queries that can attend to each token
    rec = attn.sum(dim=-2) / counts
    return rec.reshape(attn.shape[0], attn.shape[1], gh, gw)


class SwinBackbone(Backbone):
    is_transformer = True
    has_cls_token = False
    #: attention fusion reads window attention (core/models/heads/fusion.py), not a CLS row
    attention_kind = "window"
    library_attr = "timm_model"
    family = "swin"
    size_multiple = 32

    def __init__(self, name: str, image_size: int = 224, drop_path_rate: float = 0.0, **kw):
        super().__init__()
        arch, custom, native = SWIN_ARCHS[name]
        self.name = name
        self.library_arch = arch
        common = dict(num_classes=0, img_size=native, dynamic_img_size=True,
                      drop_path_rate=drop_path_rate, **kw)
        if custom is not None:
            self.timm_kwargs = dict(custom, img_size=native)
            model = SwinTransformer(**custom, **common)
        else:
            self.timm_kwargs = {}
            model = timm.create_model(arch, pretrained=False, **common)
        self.timm_model = model
        self.image_size = image_size
        self.native_size = native
        self.patch_size = 4
        self.stride = 32
        self.num_blocks = len(model.layers)
        self._stage_dims = [int(f["num_chs"]) for f in model.feature_info]
        self.embed_dim = self.dense_dim = int(model.num_features)
        self.num_heads = int(model.layers[-1].blocks[0].attn.num_heads)

    def intermediate_dims(self, indices: Sequence[int]) -> list[int]:
        return [self._stage_dims[i] for i in self.normalize_indices(indices)]

    def grid_size(self, h: int, w: int) -> tuple[int, int]:
        return h // 32, w // 32

    def layers(self) -> dict[str, nn.Module]:
        m = self.timm_model
        out: dict[str, nn.Module] = {"patch_embed": m.patch_embed}
        for i, s in enumerate(m.layers):
            out[f"stage{i}"] = s
        return out

    def layer_output_to_map(self, output, image_hw):
        if isinstance(output, (tuple, list)):
            output = output[0]
        return output.permute(0, 3, 1, 2)  # every Swin stage / patch_embed output is NHWC

    def attention_block(self, stage: int = -1) -> SwinTransformerBlock:
        """The timm block whose attention `forward_all(attention_blocks=(stage,))` returns: the stage's last."""
        return self.timm_model.layers[self.normalize_indices([stage])[0]].blocks[-1]

    def attention_window(self, stage: int = -1) -> tuple[tuple[int, int], tuple[int, int]]:
        """(window_size, shift_size) of that block (fixed by timm when the model is built)."""
        blk = self.attention_block(stage)
        return tuple(int(v) for v in blk.window_size), tuple(int(v) for v in blk.shift_size)

    def forward_all(self, x: torch.Tensor, intermediates: Sequence[int] = (),
                    attention_blocks: Sequence[int] = ()) -> BackboneOutput:
        self.check_input_size(x.shape[-2], x.shape[-1])
        want = self.normalize_indices(intermediates)
        self.normalize_indices(attention_blocks)  # one-line ConfigError when out of range
        m = self.timm_model
        blocks = {i: self.attention_block(i) for i in attention_blocks}
        with capture_window_attention(blocks) as attentions:
            if want:
                uniq = sorted(set(want))
                feats, inter = m.forward_intermediates(x, indices=uniq, norm=False, output_fmt="NCHW")
                by_idx = dict(zip(uniq, inter))
                inter = [by_idx[i] for i in want]
            else:
                feats, inter = m.forward_features(x), []
        dense = feats.permute(0, 3, 1, 2)
        pooled = feats.mean(dim=(1, 2))
        return BackboneOutput(pooled=pooled, dense=dense, intermediates=inter, attentions=dict(attentions))

    def received_attention(self, attn: torch.Tensor, grid: Sequence[int], stage: int = -1) -> torch.Tensor:
        """`received_attention_maps` with this backbone's window / shift of `stage` (the last by default)."""
        window, shift = self.attention_window(stage)
        return received_attention_maps(attn, grid, window, shift)

    def attention_saliency(self, x: torch.Tensor) -> torch.Tensor:
        """Attention received per token in the last block, per head: (B, heads, H/32, W/32), >= 0."""
        attn = self.forward_all(x, attention_blocks=[-1]).attentions[-1]
        return self.received_attention(attn, self.grid_size(x.shape[-2], x.shape[-1]))


def make_swin(name: str):
    def build(image_size: int = 224, **kw) -> SwinBackbone:
        return SwinBackbone(name, image_size=image_size, **kw)
    build.__name__ = name
    return build
