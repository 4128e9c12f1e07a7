"""Attention-weight capture by forward hooks, for the requested blocks only.

The wrapped library's attention modules are never edited: training keeps timm's fused
`scaled_dot_product_attention`. When a caller asks for block i's attention, a forward hook is put
on that block's attention module for the duration of one forward pass; it recomputes
``softmax((q * scale) @ k^T)`` from the module's own ``qkv`` (and ``q_norm`` / ``k_norm``) applied to
the hook's input (the normed tokens the module saw), then the hook is removed.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn


def timm_attention_weights(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, N) softmax attention of a timm `Attention` module for its input tokens x."""
    B, N, _ = x.shape
    heads = attn.num_heads
    head_dim = getattr(attn, "head_dim", None) or attn.qkv.out_features // (3 * heads)
    qkv = attn.qkv(x).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    return scores.float().softmax(dim=-1).to(x.dtype)


@contextlib.contextmanager
def capture_attention(modules: dict[int, nn.Module],
                      compute: Callable[[nn.Module, torch.Tensor], torch.Tensor]
                      ) -> Iterator[dict[int, torch.Tensor]]:
    """Hook `modules` ({block index: attention module}) for one pass; yields the filled dict."""
    store: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(idx: int):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["x"]
            store[idx] = compute(module, x)
        return hook

    try:
        for idx, mod in modules.items():
            handles.append(mod.register_forward_hook(make_hook(idx), with_kwargs=True))
        yield store
    finally:
        for h in handles:
            h.remove()
