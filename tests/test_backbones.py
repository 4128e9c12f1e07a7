"""Backbone registry and wrappers: shapes, attention capture, intermediates, input checks."""

import pytest
import torch
import torch.nn.functional as F

from core.errors import ConfigError
from core.models import BackboneOutput, check_backbone_name, create_backbone, list_backbones

NAMES = ["resnet50", "resnet18", "resnet_tiny", "vit_tiny_patch16", "vit_small_patch16",
         "vit_small_patch8", "vit_base_patch16", "vit_base_patch8", "vit_nano_patch8", "swin_tiny",
         "swin_nano", "vitpytorch_small"]
FAST = ["resnet_tiny", "resnet18", "vit_nano_patch8", "vit_small_patch16", "swin_nano",
        "vitpytorch_small"]
EXPECTED = {  # name: (embed_dim, dense_dim, stride)
    "resnet50": (2048, 2048, 32), "resnet18": (512, 512, 32), "resnet_tiny": (256, 256, 8),
    "vit_tiny_patch16": (192, 192, 16), "vit_small_patch16": (384, 384, 16),
    "vit_small_patch8": (384, 384, 8), "vit_base_patch16": (768, 768, 16),
    "vit_base_patch8": (768, 768, 8), "vit_nano_patch8": (96, 96, 8), "swin_tiny": (768, 768, 32),
    "swin_nano": (384, 384, 32), "vitpytorch_small": (384, 384, 16),
}


def _seed():
    torch.manual_seed(0)


def test_registry_lists_every_documented_name():
    assert list_backbones() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_every_backbone_builds_with_documented_attributes(name):
    _seed()
    # big models are only constructed (on the meta device: no memory, no init cost)
    with torch.device("cpu" if name in FAST else "meta"):
        b = create_backbone(name, image_size=64)
    assert b.name == name
    assert (b.embed_dim, b.dense_dim, b.stride) == EXPECTED[name]
    assert b.is_transformer == (not name.startswith("resnet"))
    assert b.has_cls_token == (name.startswith("vit"))
    assert (b.num_heads > 0) == b.is_transformer
    assert b.num_blocks > 0
    assert (b.patch_size is None) == name.startswith("resnet")
    lib = b.timm_model if hasattr(b, "timm_model") else (b.tv_model if hasattr(b, "tv_model") else b.vp_model)
    assert b.library_model is lib
    assert len(b.layers()) >= 4


@pytest.mark.parametrize("name", FAST)
def test_forward_all_shapes(name):
    _seed()
    b = create_backbone(name, image_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    att = (0, -1) if b.has_cls_token else ()
    with torch.no_grad():
        out = b.forward_all(x, intermediates=(0, -1), attention_blocks=att)
        pooled, dense = b(x), b.forward_dense(x)
    assert isinstance(out, BackboneOutput)
    gh, gw = b.grid_size(64, 64)
    assert out.pooled.shape == (2, b.embed_dim)
    assert out.dense.shape == (2, b.dense_dim, gh, gw)
    assert torch.allclose(pooled, out.pooled, atol=1e-5)
    assert torch.allclose(dense, out.dense, atol=1e-5)
    dims = b.intermediate_dims((0, -1))
    assert [t.shape[:2] for t in out.intermediates] == [(2, d) for d in dims]
    assert out.intermediates[-1].shape[-2:] == (gh, gw)
    if b.has_cls_token:
        T = 1 + gh * gw
        assert set(out.attentions) == {0, -1}
        for a in out.attentions.values():
            assert a.shape == (2, b.num_heads, T, T)
            assert torch.allclose(a.sum(-1), torch.ones(()), atol=1e-5)
    else:
        assert out.attentions == {}


def test_intermediates_follow_requested_order_and_negative_indices():
    b = create_backbone("vit_nano_patch8", image_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = b.forward_all(x, intermediates=(-1, 1, 3))
    assert len(out.intermediates) == 3
    assert torch.equal(out.intermediates[0], out.intermediates[2])  # -1 == 3 (depth 4)
    r = create_backbone("resnet_tiny").eval()
    with torch.no_grad():
        o = r.forward_all(torch.randn(1, 3, 64, 64), intermediates=(0, 1, 2, 3))
    assert [t.shape[1] for t in o.intermediates] == [32, 64, 128, 256]
    assert [t.shape[-1] for t in o.intermediates] == [64, 32, 16, 8]  # small-image stem: stride 1/2/4/8
    with pytest.raises(ConfigError, match="out of range"):
        b.forward_all(x, intermediates=(4,))


def _manual_attention(block, x_in):
    """softmax(q k^T * scale) from the block's own weights on its normed input."""
    a = block.attn
    h = block.norm1(x_in)
    B, N, C = h.shape
    qkv = F.linear(h, a.qkv.weight, a.qkv.bias).reshape(B, N, 3, a.num_heads, C // a.num_heads)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    return ((q @ k.transpose(-2, -1)) * (C // a.num_heads) ** -0.5).softmax(-1)


def test_vit_attention_equals_direct_computation_and_timm_slow_path():
    _seed()
    b = create_backbone("vit_nano_patch8", image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    blk = b.timm_model.blocks[2]
    seen = {}
    h = blk.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    with torch.no_grad():
        out = b.forward_all(x, attention_blocks=(2,))
    h.remove()
    with torch.no_grad():
        ref = _manual_attention(blk, seen["x"])
    assert torch.allclose(out.attentions[2], ref, atol=1e-5)
    # timm's own non-fused path gives the same softmax
    slow = {}
    blk.attn.fused_attn = False
    h = blk.attn.attn_drop.register_forward_hook(lambda m, i, o: slow.__setitem__("a", o))
    with torch.no_grad():
        b(x)
    h.remove()
    blk.attn.fused_attn = True
    assert torch.allclose(out.attentions[2], slow["a"], atol=1e-5)


def test_attention_only_computed_when_asked(monkeypatch):
    import core.models.backbones.vit as vit_mod

    b = create_backbone("vit_nano_patch8", image_size=32).eval()
    assert all(blk.attn.fused_attn for blk in b.timm_model.blocks)
    calls = {"recompute": 0, "sdpa": 0}
    orig_w, orig_sdpa = vit_mod.timm_attention_weights, F.scaled_dot_product_attention

    def counting_w(m, x):
        calls["recompute"] += 1
        return orig_w(m, x)

    def counting_sdpa(*a, **k):
        calls["sdpa"] += 1
        return orig_sdpa(*a, **k)

    monkeypatch.setattr(vit_mod, "timm_attention_weights", counting_w)
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = b.forward_all(x, intermediates=(1,))
    assert out.attentions == {} and calls["recompute"] == 0
    assert calls["sdpa"] == b.num_blocks  # fused path for every block
    with torch.no_grad():
        out = b.forward_all(x, attention_blocks=(-1,))
    assert calls["recompute"] == 1 and set(out.attentions) == {-1}
    assert calls["sdpa"] == 2 * b.num_blocks  # still fused while capturing
    for blk in b.timm_model.blocks:  # hooks removed
        assert not blk.attn._forward_hooks


def test_attention_gradients_flow_for_fine_tuning():
    b = create_backbone("vit_nano_patch8", image_size=32).train()
    out = b.forward_all(torch.randn(2, 3, 32, 32), attention_blocks=(-1,))
    (out.attentions[-1][:, :, 0, 1:].sum() + out.dense.mean()).backward()
    assert b.timm_model.blocks[-1].attn.qkv.weight.grad is not None


def test_vitpytorch_attention_rows_and_hooks_removed():
    b = create_backbone("vitpytorch_small", image_size=32).eval()
    with torch.no_grad():
        out = b.forward_all(torch.randn(1, 3, 32, 32), attention_blocks=(-1,))
    a = out.attentions[-1]
    assert a.shape == (1, 6, 5, 5)
    assert torch.allclose(a.sum(-1), torch.ones(()), atol=1e-5)
    assert not b.vp_model.transformer.layers[-1][0].attend._forward_hooks
    # other input sizes: positional embedding is resampled
    with torch.no_grad():
        assert b.forward_dense(torch.randn(1, 3, 64, 48)).shape == (1, 384, 4, 3)


def test_cnn_refuses_attention_swin_gives_window_attention():
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ConfigError, match="CNN"):
        create_backbone("resnet_tiny").forward_all(x, attention_blocks=(-1,))
    # Swin: the last stage's last block as (B, heads, N, N) over the stage's tokens, rows summing to 1
    # (structure and timm reference: tests/test_swin_attention.py)
    with torch.no_grad():
        a = create_backbone("swin_nano").forward_all(x, attention_blocks=(-1,)).attentions[-1]
    assert a.shape == (1, 24, 4, 4)
    assert torch.allclose(a.sum(-1), torch.ones(1, 24, 4), atol=1e-5)


@pytest.mark.parametrize("name,size,mult", [("vit_nano_patch8", (60, 64), 8),
                                            ("vit_tiny_patch16", (64, 40), 16),
                                            ("swin_nano", (48, 64), 32)])
def test_bad_image_size_refused(name, size, mult):
    b = create_backbone(name, image_size=64)
    with pytest.raises(ConfigError) as e:
        b(torch.randn(1, 3, *size))
    msg = str(e.value)
    assert msg == (f"image size {size[0]}x{size[1]} is not divisible by patch size {mult} of "
                   f"{name}; use a multiple of {mult}")
    b.check_input_size(64, 64)


def test_resnet_too_small_refused_but_odd_sizes_ok():
    b = create_backbone("resnet_tiny").eval()
    with pytest.raises(ConfigError, match="too small"):
        b.check_input_size(16, 64)
    with torch.no_grad():
        assert b.forward_dense(torch.randn(1, 3, 70, 50)).shape[-2:] == b.grid_size(70, 50)


def test_unknown_name_refused_with_choices():
    with pytest.raises(ConfigError) as e:
        create_backbone("vit_huge")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("backbone='vit_huge' is not known; choose one of: ")
    assert all(n in msg for n in NAMES)
    with pytest.raises(ConfigError, match="^model.backbone='x' is not known"):
        check_backbone_name("model.backbone", "x")
    assert check_backbone_name("b", "swin_nano") == "swin_nano"


def test_resnet_output_stride_option():
    b = create_backbone("resnet50", image_size=64, output_stride=16).eval()
    assert b.stride == 16
    with torch.no_grad():
        assert b.forward_dense(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 4, 4)
    assert create_backbone("resnet50", output_stride=8).stride == 8
    with pytest.raises(ConfigError, match="BasicBlock"):
        create_backbone("resnet18", output_stride=16)


def test_resnet_channels_last_same_output():
    b = create_backbone("resnet_tiny").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = b(x)
        b = b.to(memory_format=torch.channels_last)
        out = b(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(ref, out, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet_tiny", "vit_nano_patch8", "swin_nano", "vitpytorch_small"])
def test_layers_outputs_convert_to_maps(name):
    b = create_backbone(name, image_size=64).eval()
    got = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o))
             for n, m in b.layers().items()]
    with torch.no_grad():
        b.forward_dense(torch.randn(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert set(got) == set(b.layers())
    for n, o in got.items():
        m = b.layer_output_to_map(o, (64, 64))
        assert m.dim() == 4 and m.shape[0] == 1, (n, m.shape)
