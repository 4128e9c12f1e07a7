"""Swin window attention (core/models/backbones/swin.py) and attention fusion on Swin
(core/models/heads/fusion.py): the recovered patch-to-patch matrix against timm's own WindowAttention
(shifted windows, padding, clamped windows), its block-diagonal structure, the received-attention maps
of fusion 1, and E3 / E4 on swin_nano end to end. CPU, tiny sizes."""

from __future__ import annotations

import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock

from core.errors import ConfigError
from core.models.backbones.swin import (
    capture_window_attention,
    received_attention_maps,
    token_groups,
    window_layout,
)
from core.models.heads import create_head
from core.models.heads.fusion import AttentionAffinityFusion, AttentionFeatureFusion, check_fusion, patch_affinity
from core.models.registry import create_backbone
from core.models.segmenter import Segmenter

K = 5


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    return create_backbone("swin_nano", image_size=64).eval()


def _timm_reference(block: SwinTransformerBlock, x: torch.Tensor, attn_raw: torch.Tensor) -> tuple:
    """timm's own attention branch `block._attn(norm1(x))` and the same output rebuilt from our
    (B, heads, N, N) matrix (NOT renormalised): out = proj(A V + (1 - rowsum) v_pad), v_pad being the
    value of a padded (zero) token, i.e. the qkv bias (timm does not mask padding)."""
    b, h, w, c = x.shape
    heads = block.attn.num_heads
    xn = block.norm1(x)
    ref = block._attn(xn).reshape(b, h * w, c)
    v = block.attn.qkv(xn.reshape(b, h * w, c)).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)[2]
    v_pad = block.attn.qkv.bias[2 * c:].reshape(heads, 1, -1)
    o = attn_raw @ v + (1 - attn_raw.sum(-1, keepdim=True)) * v_pad
    return ref, block.attn.proj(o.transpose(1, 2).reshape(b, h * w, c))


def _block_cases(nano):
    m = nano.timm_model
    torch.manual_seed(1)
    padded = SwinTransformerBlock(dim=16, input_resolution=(16, 16), num_heads=2, window_size=7, shift_size=3,
                                  dynamic_mask=True).eval()  # swin_tiny's stage 2 at 512 px: shift + padding
    return {
        "nano_stage1_shifted_8x8": (m.layers[1].blocks[-1], (8, 8)),
        "nano_stage3_clamped_3x4_padded": (m.layers[3].blocks[-1], (3, 4)),
        "timm_block_shift3_pad_16x16": (padded, (16, 16)),
        "timm_block_shift3_pad_9x16": (padded, (9, 16)),
    }


@pytest.mark.parametrize("case", ["nano_stage1_shifted_8x8", "nano_stage3_clamped_3x4_padded",
                                  "timm_block_shift3_pad_16x16", "timm_block_shift3_pad_9x16"])
def test_window_attention_rebuilds_timm_output_and_is_block_diagonal(nano, case):
    block, (h, w) = _block_cases(nano)[case]
    torch.manual_seed(2)
    x = torch.randn(2, h, w, block.dim)
    with torch.no_grad():
        with capture_window_attention({0: block}, renormalize=False) as raw:
            block(x)
        with capture_window_attention({0: block}) as norm:
            block(x)
        ref, rebuilt = _timm_reference(block, x, raw[0])
    n = h * w
    a = norm[0]
    assert a.shape == (2, block.attn.num_heads, n, n)
    assert torch.allclose(rebuilt, ref, atol=1e-5), (rebuilt - ref).abs().max()
    # rows sum to 1 over the real tokens; exactly zero outside each token's window group
    assert torch.allclose(a.sum(-1), torch.ones(2, block.attn.num_heads, n), atol=1e-5)
    g = token_groups(h, w, block.window_size, block.shift_size)
    outside = g[:, None] != g[None, :]
    assert outside.any() and (a[..., outside] == 0).all()
    assert (a[..., ~outside] > 0).all()


def test_window_layout_hand_example():
    # 4x4 map, 2x2 windows, shift 1: window 0 of the rolled map holds tokens (1,1),(1,2),(2,1),(2,2)
    index, group = window_layout(4, 4, (2, 2), (1, 1))
    assert index.shape == (4, 4)
    assert index[0].tolist() == [5, 6, 9, 10]
    assert index[3].tolist() == [15, 12, 3, 0]  # the wrapped corner window
    assert len(set(group[3].tolist())) == 4 and len(set(group[0].tolist())) == 1  # masked into 4 regions
    index, _ = window_layout(3, 3, (2, 2), (0, 0))  # padding -> -1
    assert index[3].tolist() == [8, -1, -1, -1]


def test_one_window_equals_full_attention(nano):
    """swin_nano at 64 px: the last stage's 2x2 map is one (clamped, unshifted) window, so the matrix is the
    plain softmax attention over all 4 tokens, computed here by hand from the block's input."""
    x = torch.randn(2, 3, 64, 64)
    block = nano.timm_model.layers[-1].blocks[-1]
    seen = {}
    hd = block.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            a = nano.forward_all(x, attention_blocks=(-1,)).attentions[-1]
    finally:
        hd.remove()
    assert tuple(block.window_size) == (2, 2) and not any(block.shift_size)
    attn = block.attn
    with torch.no_grad():
        t = block.norm1(seen["x"]).reshape(2, 4, -1)
        q, k, _ = attn.qkv(t).reshape(2, 4, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(4, 4, -1).permute(2, 0, 1)
        full = ((q * attn.scale) @ k.transpose(-2, -1) + bias).softmax(-1)
    assert a.shape == (2, nano.num_heads, 4, 4)
    assert torch.allclose(a, full, atol=1e-6)
    assert (a > 0).all()


def test_forward_all_attention_is_per_stage_and_hooks_are_removed(nano):
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        out = nano.forward_all(x, intermediates=(-1,), attention_blocks=(1, -1))
    assert set(out.attentions) == {1, -1}
    assert out.attentions[1].shape == (1, 6, 16 * 12, 16 * 12)
    assert out.attentions[-1].shape == (1, 24, 4 * 3, 4 * 3)
    for blk in (nano.timm_model.layers[1].blocks[-1], nano.timm_model.layers[-1].blocks[-1]):
        assert not blk._forward_pre_hooks and not blk.attn._forward_hooks
    with pytest.raises(ConfigError, match="block index 4 is out of range"):
        nano.forward_all(x, attention_blocks=(4,))


def test_received_maps_hand_computation():
    # 2x4 map in two 2x2 windows: received = column sum within the window / 4 queries
    torch.manual_seed(0)
    g = token_groups(2, 4, (2, 2), (0, 0))
    same = g[:, None] == g[None, :]
    a = torch.rand(3, 2, 8, 8) * same
    a = a / a.sum(-1, keepdim=True)
    rec = received_attention_maps(a, (2, 4), (2, 2), (0, 0))
    assert rec.shape == (3, 2, 2, 4)
    assert torch.allclose(rec.flatten(2), a.sum(-2) / 4)
    assert (rec >= 0).all() and (rec <= 1).all()
    # each window's received mass averages to 1 / (window size)
    assert torch.allclose(rec[..., :2].mean((-2, -1)), torch.full((3, 2), 0.25))


def test_attention_saliency_is_the_received_map(nano):
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        s = nano.attention_saliency(x)
        a = nano.forward_all(x, attention_blocks=(-1,)).attentions[-1]
    assert s.shape == (2, nano.num_heads, 3, 2) and (s >= 0).all()
    assert torch.allclose(s, nano.received_attention(a, (3, 2)))


def test_fusion_features_on_swin_maps_channels_and_grads(nano):
    fusion = AttentionFeatureFusion.from_backbone(nano, blocks=1)
    assert fusion.out_channels == nano.num_heads == 24 and fusion.attention_blocks == (3,)
    x = torch.randn(2, 3, 96, 96)  # last stage 3x3: 2x2 windows on the padded 4x4 map
    feats = nano.forward_all(x, attention_blocks=fusion.attention_blocks)
    maps = fusion(feats.attentions, feats.dense.shape[-2:])
    assert maps.shape == (2, 24, 3, 3)
    assert maps.min() >= 0 and torch.allclose(maps.amax(dim=(-2, -1)), torch.ones(2, 24))
    head = create_head("setr_pup", nano, K, extra_in_channels=fusion.out_channels, channels=32)
    model = Segmenter(nano, head, fusion, num_classes=K).train()
    nano.zero_grad(set_to_none=True)
    out = model(x[:1])
    assert out.shape == (1, K, 96, 96)
    out.logsumexp(1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)
    assert nano.timm_model.layers[-1].blocks[-1].attn.qkv.weight.grad is not None  # maps carry gradients
    nano.zero_grad(set_to_none=True)
    with pytest.raises(ConfigError, match="fusion_blocks=2: fusion 1 on swin_nano reads the last stage's last block"):
        check_fusion("features", nano, blocks=2)


def test_fusion_affinity_on_swin_is_windowed_and_alpha_zero_is_plain(nano):
    x = torch.randn(1, 3, 128, 128)  # last stage 4x4 in 2x2 windows: A is block-diagonal
    with torch.no_grad():
        a = nano.forward_all(x, attention_blocks=(-1,)).attentions[-1]
    aff = patch_affinity(a, (4, 4))
    assert torch.allclose(aff.sum(-1), torch.ones(1, 16), atol=1e-5)
    g = token_groups(4, 4, (2, 2), (0, 0))
    assert (aff[:, g[:, None] != g[None, :]] == 0).all()
    head = create_head("linear", nano, K)
    plain = Segmenter(nano, head).eval()
    with torch.no_grad():
        zero = Segmenter(nano, head, AttentionAffinityFusion.from_backbone(nano, alpha=0.0)).eval()
        assert torch.equal(zero(x), plain(x))
        half = Segmenter(nano, head, AttentionAffinityFusion.from_backbone(nano, alpha=0.5)).eval()
        assert not torch.equal(half(x), plain(x))


def _preset(evaluation: str, root=None):
    from core.config import SegmentConfig
    from core.evaluations import apply_evaluation

    data = {"image_size": 64, "limit_train": 8, "limit_val": 4}
    if root is not None:
        data["root"] = str(root)
    d = apply_evaluation({"backbone": "swin_nano", "epochs": 1, "batch_size": 4, "wandb": "disabled",
                          "device": "cpu", "data": data}, evaluation)
    return SegmentConfig.from_dict(d)


def test_e4_on_swin_nano_forward_backward():
    """E4's model on swin_nano (the E4 run itself is the same path as E3's below, fusion aside)."""
    from core.models.segmenter import build_segmenter

    cfg = _preset("E4")
    assert (cfg.backbone, cfg.head, cfg.fusion) == ("swin_nano", "setr_pup", "affinity")
    torch.manual_seed(0)
    model = build_segmenter(cfg, K).train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, K, 64, 64)
    torch.nn.functional.cross_entropy(out, torch.randint(0, K, (2, 64, 64))).backward()
    g = model.fusion.alpha_logit.grad
    assert g is not None and torch.isfinite(g) and g != 0
    assert model.backbone.timm_model.layers[-1].blocks[-1].attn.qkv.weight.grad.abs().sum() > 0


def test_e3_trains_and_scores_on_swin_nano(tmp_path, voc_root):
    from core.runs.segment import run_segment

    cfg = _preset("E3", voc_root)
    assert (cfg.backbone, cfg.head, cfg.fusion) == ("swin_nano", "setr_pup", "features")
    m = run_segment(cfg, tmp_path / "E3", progress=False)
    assert (m["evaluation"], m["backbone"], m["fusion"]) == ("E3", "swin_nano", "features")
    assert 0.0 <= m["mIoU"] <= 100.0 and (tmp_path / "E3" / "model.pt").is_file()
