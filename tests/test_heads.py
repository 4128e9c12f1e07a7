"""Segmentation heads and attention fusion: shapes, gradients, refusals, fusion maths.

Every head is run on small fake backbones (defined here, following the `Backbone` contract) and on
the real tiny backbones of `core.models.registry` (resnet_tiny, vit_nano_patch8, swin_nano).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from core.errors import ConfigError
from core.models.heads import HEADS, check_head_channels, check_head_name, create_head, head_refusal, heads_with_width
from core.models.heads.fusion import (
    AttentionAffinityFusion,
    AttentionFeatureFusion,
    check_fusion,
    cls_attention_maps,
    fusion_refusal,
    patch_affinity,
    propagate,
)
from core.models.heads.setr import token_norm
from core.models.segmenter import Segmenter

NUM_CLASSES = 5
SIZE = 64


# ---------------------------------------------------------------------------------- fake backbones
@dataclass
class FakeOutput:
    pooled: torch.Tensor
    dense: torch.Tensor
    intermediates: list = field(default_factory=list)
    attentions: dict = field(default_factory=dict)


def _norm(indices, n):
    return [int(i) + n if int(i) < 0 else int(i) for i in indices]


class _FakeBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, t):
        b, n, d = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(-1)  # (B, heads, T, T)
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return t + self.proj(out), attn


class FakeViT(nn.Module):
    """A 16-dim ViT with a CLS token and one register token (prefix 2), patch 8."""

    is_transformer = True
    has_cls_token = True

    def __init__(self, num_blocks=4, patch=8, dim=16, heads=2, prefix=2, name="fake_vit"):
        super().__init__()
        self.name, self.num_blocks, self.patch_size, self.stride = name, num_blocks, patch, patch
        self.embed_dim = self.dense_dim = dim
        self.num_heads, self.prefix = heads, prefix
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.tokens = nn.Parameter(torch.randn(1, prefix, dim) * 0.1)
        self.blocks = nn.ModuleList([_FakeBlock(dim, heads) for _ in range(num_blocks)])

    def intermediate_dims(self, indices):
        return [self.dense_dim] * len(indices)

    def forward_all(self, x, intermediates=(), attention_blocks=()):
        p = self.patch(x)
        b, d, gh, gw = p.shape
        t = torch.cat([self.tokens.expand(b, -1, -1), p.flatten(2).transpose(1, 2)], 1)
        want, want_attn = _norm(intermediates, self.num_blocks), set(_norm(attention_blocks, self.num_blocks))
        maps, attns = {}, {}
        for i, blk in enumerate(self.blocks):
            t, a = blk(t)
            maps[i] = t[:, self.prefix:].transpose(1, 2).reshape(b, d, gh, gw)
            if i in want_attn:
                attns[i] = a
        ask = {j: i for i, j in zip(attention_blocks, _norm(attention_blocks, self.num_blocks))}
        return FakeOutput(t[:, 0], maps[self.num_blocks - 1], [maps[i] for i in want],
                          {ask[j]: a for j, a in attns.items()})


class FakeCNN(nn.Module):
    """Four stages at strides 4, 8, 16, 32 (like a ResNet)."""

    is_transformer = False
    has_cls_token = False
    num_heads = 0
    patch_size = None

    def __init__(self, dims=(8, 12, 16, 24), name="fake_cnn"):
        super().__init__()
        self.name, self.num_blocks, self.stride, self.dims = name, 4, 32, dims
        self.embed_dim = self.dense_dim = dims[-1]
        self.stem = nn.Conv2d(3, dims[0], 4, 4)
        self.stages = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(dims[max(i - 1, 0)], d, 3, 1 if i == 0 else 2, 1), nn.ReLU()) for i, d in enumerate(dims)]
        )

    def intermediate_dims(self, indices):
        return [self.dims[i] for i in _norm(indices, 4)]

    def forward_all(self, x, intermediates=(), attention_blocks=()):
        x = self.stem(x)
        outs = []
        for s in self.stages:
            x = s(x)
            outs.append(x)
        return FakeOutput(x.mean((2, 3)), x, [outs[i] for i in _norm(intermediates, 4)], {})


class FakeSwin(FakeCNN):
    """Hierarchical transformer without CLS token and without Swin's window attention: fusion refuses it."""

    is_transformer = True
    num_heads = 2

    def __init__(self):
        super().__init__(name="fake_swin")


class FakeStride12(FakeViT):
    def __init__(self):
        super().__init__(patch=12, name="fake_vit_patch12")


FAKES = {"fake_vit": FakeViT, "fake_cnn": FakeCNN, "fake_swin": FakeSwin}
REAL = ("resnet_tiny", "vit_nano_patch8", "swin_nano")


_REAL_CACHE: dict = {}


def real_backbone(name):
    """Real tiny backbones are built once per session (no test changes their weights) and handed
    out with gradients cleared and in train mode."""
    registry = pytest.importorskip("core.models.registry")
    if name not in _REAL_CACHE:
        torch.manual_seed(0)
        _REAL_CACHE[name] = registry.create_backbone(name, image_size=SIZE)
    bb = _REAL_CACHE[name]
    bb.zero_grad(set_to_none=True)
    for p in bb.parameters():
        p.requires_grad_(True)
    return bb.train()


def make_backbone(name):
    torch.manual_seed(0)
    return FAKES[name]() if name in FAKES else real_backbone(name)


def small(head_name):
    """Narrow decoder widths keep the CPU tests fast (defaults are the papers' 256)."""
    if head_name.startswith("setr"):
        return {"channels": 32} if head_name != "setr_mla" else {"channels": 32, "mla_channels": 16}
    return {"embed_dim": 32} if head_name == "segformer" else {}


def _finite_grads(params):
    grads = [p.grad for p in params if p.requires_grad]
    return grads and all(g is not None and torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------- registry
def test_registry_names():
    assert set(HEADS) == {"linear", "setr_naive", "setr_pup", "setr_mla", "deeplabv3", "segformer"}
    check_head_name("head", "linear")
    with pytest.raises(ConfigError, match=r"head='unet' is not known; choose one of: linear, setr_naive"):
        check_head_name("head", "unet")
    with pytest.raises(ConfigError):
        create_head("unet", FakeViT(), NUM_CLASSES)


# ---------------------------------------------------------------------------------- every head x backbone
@pytest.mark.parametrize("bb_name", list(FAKES) + list(REAL))
@pytest.mark.parametrize("head_name", list(HEADS))
def test_head_shapes_and_gradients(bb_name, head_name):
    bb = make_backbone(bb_name)
    assert head_refusal(head_name, bb) is None
    head = create_head(head_name, bb, NUM_CLASSES, **small(head_name))
    model = Segmenter(bb, head, num_classes=NUM_CLASSES).train()
    x = torch.randn(2, 3, SIZE, SIZE)
    out = model(x)
    assert out.shape == (2, NUM_CLASSES, SIZE, SIZE)
    target = torch.randint(0, NUM_CLASSES, (2, SIZE, SIZE))
    torch.nn.functional.cross_entropy(out, target).backward()
    assert _finite_grads(head.parameters())
    assert all(p.grad.abs().sum() > 0 for n, p in head.named_parameters() if n.endswith("weight"))
    bb_grads = [p.grad for p in bb.parameters() if p.grad is not None]
    assert bb_grads and all(torch.isfinite(g).all() for g in bb_grads)
    assert any(g.abs().sum() > 0 for g in bb_grads)


def test_frozen_backbone_gets_no_grad_and_stays_eval():
    bb = make_backbone("fake_cnn")
    bb.stages.append(nn.BatchNorm2d(24))  # a norm layer whose running stats must not move
    bb.stages[-1].eval()
    model = Segmenter(bb, create_head("linear", bb, NUM_CLASSES), frozen=True).train()
    assert not bb.training and model.head.training
    before = bb.stages[-1].running_mean.clone()
    out = model(torch.randn(2, 3, SIZE, SIZE))
    out.sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in bb.parameters())
    assert torch.equal(bb.stages[-1].running_mean, before)
    assert _finite_grads(model.head.parameters())


# ---------------------------------------------------------------------------------- head width
def _conv_widths(head) -> set[int]:
    """Output channels of every conv of `head` but its classifier."""
    return {m.out_channels for n, m in head.named_modules() if isinstance(m, nn.Conv2d) and "classifier" not in n}


def test_head_channels_reach_the_convs():
    """`channels` (SegmentConfig.head_channels) is the width of every conv of the heads that have one; MLA's
    streams keep `mla_channels`."""
    assert set(heads_with_width()) == {"setr_naive", "setr_pup", "setr_mla", "segformer"}
    for name in heads_with_width():
        bb = make_backbone("fake_vit")
        head = create_head(name, bb, NUM_CLASSES, head_channels=24, **({"mla_channels": 16} if name == "setr_mla" else {}))
        assert _conv_widths(head) == ({24, 16} if name == "setr_mla" else {24}), name
        out = Segmenter(bb, head, num_classes=NUM_CLASSES)(torch.randn(2, 3, SIZE, SIZE))
        assert out.shape == (2, NUM_CLASSES, SIZE, SIZE)
    pup = create_head("setr_pup", make_backbone("vit_nano_patch8"), NUM_CLASSES, head_channels=64)
    assert len(pup.stages) == 3 and all(st[0].out_channels == 64 and st[1].num_features == 64 for st in pup.stages)
    assert pup.classifier.in_channels == 64


@pytest.mark.parametrize("head_name", list(HEADS))
def test_default_width_builds_what_the_head_builds_by_itself(head_name):
    """head_channels none: the very module the head builds without the argument (the reference 256)."""
    bb = make_backbone("fake_vit")
    torch.manual_seed(0)
    ref = HEADS[head_name].from_backbone(bb, NUM_CLASSES)
    torch.manual_seed(0)
    got = create_head(head_name, bb, NUM_CLASSES, head_channels=None)
    assert {k: v.shape for k, v in got.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in got.parameters()) == sum(p.numel() for p in ref.parameters())
    if HEADS[head_name].width_arg is not None:
        assert 256 in _conv_widths(got)
        wide = create_head(head_name, bb, NUM_CLASSES, head_channels=256)
        assert sum(p.numel() for p in wide.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("head_name", [n for n in HEADS if n not in heads_with_width()])
def test_head_without_width_refuses_channels(head_name):
    with pytest.raises(ConfigError) as e:
        create_head(head_name, make_backbone("fake_vit"), NUM_CLASSES, head_channels=64)
    msg = str(e.value)
    assert msg.startswith(f"head_channels=64 sets the width of the head's convolutions but head={head_name!r} has no "
                          f"such width; leave head_channels unset (none) or choose head=setr_naive") and "\n" not in msg
    check_head_channels("head_channels", head_name, None)  # none is always fine


@pytest.mark.parametrize("bad", [0, -8, 2.0, "64", True])
def test_bad_head_channels_give_one_line(bad):
    with pytest.raises(ConfigError) as e:
        check_head_channels("head_channels", "setr_pup", bad)
    assert str(e.value).startswith(f"head_channels={bad!r} is not allowed; choose a positive integer")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("head_name", ["setr_mla", "segformer"])
def test_multilevel_head_refuses_shallow_backbone(head_name):
    bb = FakeViT(num_blocks=2)
    err = head_refusal(head_name, bb)
    assert isinstance(err, ConfigError) and "needs 4 block outputs" in str(err)
    with pytest.raises(ConfigError, match="fake_vit has 2 blocks"):
        create_head(head_name, bb, NUM_CLASSES)


def test_pup_refuses_non_power_of_two_stride():
    with pytest.raises(ConfigError, match="power-of-two stride"):
        create_head("setr_pup", FakeStride12(), NUM_CLASSES)
    # the other single-level heads still fit that backbone
    create_head("setr_naive", FakeStride12(), NUM_CLASSES)


@pytest.mark.parametrize("bb_name", ["fake_cnn", "resnet_tiny"])
@pytest.mark.parametrize("fusion", ["features", "affinity"])
def test_fusion_refuses_cnn(bb_name, fusion):
    bb = make_backbone(bb_name)
    msg = (f"fusion='{fusion}' needs a transformer backbone with self-attention; {bb.name} is a CNN "
           f"— use fusion=none or a vit_* backbone")
    with pytest.raises(ConfigError) as e:
        check_fusion(fusion, bb)
    assert str(e.value) == msg
    with pytest.raises(ConfigError):
        if fusion == "features":
            AttentionFeatureFusion.from_backbone(bb)
        else:
            AttentionAffinityFusion.from_backbone(bb, alpha=0.1)


@pytest.mark.parametrize("fusion", ["features", "affinity"])
def test_fusion_refuses_transformer_without_cls_or_window_attention(fusion):
    bb = make_backbone("fake_swin")  # no CLS token and no Swin window attention to read
    with pytest.raises(ConfigError) as e:
        check_fusion(fusion, bb)
    assert str(e.value) == (f"fusion='{fusion}' needs a ViT with a CLS token or a Swin with window attention; "
                            f"fake_swin has neither — use fusion=none or a vit_* / swin_* backbone")


@pytest.mark.parametrize("fusion", ["features", "affinity"])
def test_fusion_accepts_swin(fusion):
    """Swin: fusion 1 reads the attention received per token, fusion 2 the block-diagonal window affinity
    (tests/test_swin_attention.py checks both); only fusion_blocks=1 for fusion 1."""
    bb = make_backbone("swin_nano")
    check_fusion(fusion, bb)
    err = fusion_refusal("features", bb, 2)
    assert isinstance(err, ConfigError) and "use fusion_blocks=1" in str(err) and "\n" not in str(err)


def test_fusion_features_refuses_too_many_blocks():
    with pytest.raises(ConfigError, match="fusion_blocks=5"):
        AttentionFeatureFusion.from_backbone(FakeViT(num_blocks=4), blocks=5)


# ---------------------------------------------------------------------------------- fusion 1
@pytest.mark.parametrize("bb_name", ["fake_vit", "vit_nano_patch8"])
@pytest.mark.parametrize("head_name", list(HEADS))
def test_fusion_features_channels_and_grads(bb_name, head_name):
    bb = make_backbone(bb_name)
    one = AttentionFeatureFusion.from_backbone(bb, blocks=1)
    assert one.out_channels == bb.num_heads and one.attention_blocks == (bb.num_blocks - 1,)
    k = 2
    fusion = AttentionFeatureFusion.from_backbone(bb, blocks=k)
    assert fusion.out_channels == bb.num_heads * k
    assert fusion.attention_blocks == tuple(range(bb.num_blocks - k, bb.num_blocks))
    head = create_head(head_name, bb, NUM_CLASSES, extra_in_channels=fusion.out_channels, **small(head_name))
    model = Segmenter(bb, head, fusion, num_classes=NUM_CLASSES).train()
    x = torch.randn(2, 3, SIZE, SIZE)
    feats = bb.forward_all(x, intermediates=head.needs_intermediates, attention_blocks=fusion.attention_blocks)
    extra = fusion(feats.attentions, feats.dense.shape[-2:])
    assert extra.shape == (2, bb.num_heads * k, *feats.dense.shape[-2:])
    # max-normalised: every map peaks at exactly 1, values in [0, 1]
    assert torch.allclose(extra.amax(dim=(-2, -1)), torch.ones(2, bb.num_heads * k))
    assert extra.min() >= 0
    dense, inters = head.inject(feats.dense, feats.intermediates, extra)
    if head.multi_level:
        assert inters[-1].shape[1] == feats.intermediates[-1].shape[1] + fusion.out_channels
    else:
        assert dense.shape[1] == bb.dense_dim + fusion.out_channels
    out = model(x)
    assert out.shape == (2, NUM_CLASSES, SIZE, SIZE)
    out.logsumexp(1).mean().backward()
    assert _finite_grads(head.parameters())


def test_cls_maps_take_cls_row_after_prefix():
    attn = torch.rand(1, 2, 2 + 6, 2 + 6).softmax(-1)  # prefix 2, grid 2x3
    maps = cls_attention_maps(attn, (2, 3))
    raw = attn[:, :, 0, 2:].reshape(1, 2, 2, 3)
    assert torch.allclose(maps, raw / raw.amax(dim=(-2, -1), keepdim=True))


# ---------------------------------------------------------------------------------- fusion 2
def test_affinity_is_row_stochastic_after_prefix_removal():
    bb = make_backbone("fake_vit")  # prefix of 2 tokens (CLS + register)
    x = torch.randn(2, 3, SIZE, SIZE)
    attn = bb.forward_all(x, attention_blocks=(3,)).attentions[3]
    assert attn.shape == (2, 2, 2 + 64, 2 + 64)
    a = patch_affinity(attn, (8, 8))
    assert a.shape == (2, 64, 64) and (a >= 0).all()
    assert torch.allclose(a.sum(-1), torch.ones(2, 64), atol=1e-6)
    expected = attn.mean(1)[:, 2:, 2:]
    assert torch.allclose(a, expected / expected.sum(-1, keepdim=True))


def test_propagation_matches_matrix_power():
    torch.manual_seed(0)
    b, k, gh, gw = 2, 3, 4, 5
    n = gh * gw
    logits = torch.randn(b, k, gh, gw, dtype=torch.float64)
    a_mat = torch.rand(b, n, n, dtype=torch.float64)
    a_mat = a_mat / a_mat.sum(-1, keepdim=True)
    alpha = 0.3
    out = propagate(logits, a_mat, alpha, steps=2)
    p = (1 - alpha) * torch.eye(n, dtype=torch.float64) + alpha * a_mat  # (B, N, N)
    flat = logits.reshape(b, k, n).transpose(1, 2)  # (B, N, K)
    direct = (p @ p @ flat).transpose(1, 2).reshape(b, k, gh, gw)
    assert torch.allclose(out, direct, atol=1e-12)


@pytest.mark.parametrize("bb_name", ["fake_vit", "vit_nano_patch8", "swin_nano"])
@pytest.mark.parametrize("head_name", ["linear", "setr_pup", "segformer"])
def test_affinity_alpha_zero_equals_plain_head(bb_name, head_name):
    bb = make_backbone(bb_name)
    head = create_head(head_name, bb, NUM_CLASSES, **small(head_name))
    plain = Segmenter(bb, head).eval()
    fusion = AttentionAffinityFusion.from_backbone(bb, steps=2, alpha=0.0)
    assert fusion.alpha_logit is None and float(fusion.alpha) == 0.0
    fused = Segmenter(bb, head, fusion).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(fused(x), plain(x))
        # a learnable fusion forced to a = 0 through the override gives the same
        learn = Segmenter(bb, head, AttentionAffinityFusion.from_backbone(bb, steps=2, alpha=0.5)).eval()
        assert torch.equal(learn(x, alpha=torch.tensor(0.0)), plain(x))
        assert not torch.equal(learn(x), plain(x))


def test_affinity_matches_direct_computation_and_alpha_learns():
    bb = make_backbone("fake_vit")
    head = create_head("linear", bb, NUM_CLASSES)
    fusion = AttentionAffinityFusion.from_backbone(bb, steps=2, alpha=0.25)
    assert abs(float(fusion.alpha.detach()) - 0.25) < 1e-6
    model = Segmenter(bb, head, fusion).train()
    x = torch.randn(2, 3, SIZE, SIZE)
    out = model(x)
    # direct recomputation from the same forward pass
    model.eval()
    with torch.no_grad():
        feats = bb.forward_all(x, attention_blocks=(bb.num_blocks - 1,))
        coarse = head(feats.dense)
        a_mat = feats.attentions[bb.num_blocks - 1].mean(1)[:, 2:, 2:]
        a_mat = a_mat / a_mat.sum(-1, keepdim=True)
        p = 0.75 * torch.eye(64) + 0.25 * a_mat
        flat = coarse.flatten(2).transpose(1, 2)
        prop = (p @ p @ flat).transpose(1, 2).reshape(coarse.shape)
        direct = torch.nn.functional.interpolate(prop, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        assert torch.allclose(model(x), direct, atol=1e-5)
    out.square().mean().backward()
    g = fusion.alpha_logit.grad
    assert g is not None and torch.isfinite(g) and g != 0


@pytest.mark.parametrize("bb_name", ["fake_vit", "vit_nano_patch8"])
@pytest.mark.parametrize("head_name", list(HEADS))
def test_affinity_every_head_shapes_and_grads(bb_name, head_name):
    bb = make_backbone(bb_name)
    head = create_head(head_name, bb, NUM_CLASSES, **small(head_name))
    model = Segmenter(bb, head, AttentionAffinityFusion.from_backbone(bb, steps=2, alpha=0.5)).train()
    out = model(torch.randn(2, 3, SIZE, SIZE))
    assert out.shape == (2, NUM_CLASSES, SIZE, SIZE)
    torch.nn.functional.cross_entropy(out, torch.randint(0, NUM_CLASSES, (2, SIZE, SIZE))).backward()
    assert _finite_grads(list(head.parameters()) + list(model.fusion.parameters()))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in bb.parameters())


# ---------------------------------------------------------------------------------- SETR-MLA (paper / mmseg)
@pytest.mark.parametrize("bb_name", ["fake_vit", "fake_cnn"])
def test_setr_mla_has_level_norms_and_the_3x3_after_the_sum(bb_name):
    """SETR 3.3 / mmseg MLANeck: a LayerNorm per input level (over the channels of each token), a 3x3
    conv-BN-ReLU on every top-down aggregate; gradients reach both."""
    from core.models.heads.base import four_levels

    bb = make_backbone(bb_name)
    head = create_head("setr_mla", bb, NUM_CLASSES, channels=32, mla_channels=16)
    dims = list(bb.intermediate_dims(four_levels(bb)))
    assert [n.normalized_shape for n in head.norms] == [(c,) for c in dims]
    assert all(isinstance(n, nn.LayerNorm) and n.eps == 1e-6 for n in head.norms)
    assert len(head.fuse) == 4
    for f in head.fuse:
        conv = f[0]
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3)
        assert conv.in_channels == conv.out_channels == 32 and isinstance(f[1], nn.BatchNorm2d)
    model = Segmenter(bb, head, num_classes=NUM_CLASSES).train()
    x = torch.randn(2, 3, SIZE, SIZE)
    model(x).sum().backward()
    for mod in list(head.norms) + list(head.fuse):
        for p in mod.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all()


def test_setr_mla_level_norm_is_over_channels_per_token():
    """The norm makes the head blind to a per-token affine change of a level's channels (LayerNorm
    over C at every position, as mmseg reshapes NCHW -> NLC), and nothing else is normalised."""
    bb = make_backbone("fake_vit")
    head = create_head("setr_mla", bb, NUM_CLASSES, channels=32, mla_channels=16).eval()
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 16, 4, 4, generator=g)
    normed = token_norm(head.norms[0], f)
    want = torch.nn.functional.layer_norm(f.permute(0, 2, 3, 1), (16,), eps=1e-6).permute(0, 3, 1, 2)
    assert torch.allclose(normed, want, atol=1e-6)
    scale = torch.rand(2, 1, 4, 4, generator=g) + 0.5
    shift = torch.randn(2, 1, 4, 4, generator=g)
    assert torch.allclose(token_norm(head.norms[0], f * scale + shift), normed, atol=1e-4)


# ---------------------------------------------------------------------- SETR-PUP input norm (mmseg's form)
def _pup_pair(name="vit_nano_patch8"):
    """(backbone, default SETR-PUP head, head_input_norm head) with the same conv / classifier weights."""
    from core.models.registry import create_backbone

    torch.manual_seed(0)
    bb = create_backbone(name, image_size=SIZE).eval()
    plain = create_head("setr_pup", bb, NUM_CLASSES, channels=32).eval()
    mm = create_head("setr_pup", bb, NUM_CLASSES, channels=32, input_norm=True).eval()
    missing = mm.load_state_dict(plain.state_dict(), strict=False)
    assert set(missing.missing_keys) == {"norm.weight", "norm.bias"} and not missing.unexpected_keys
    return bb, plain, mm


def test_setr_pup_input_norm_is_mmseg_setruphead_norm():
    """head_input_norm: the head's own LayerNorm(eps 1e-6) on the last block's RAW output (mmseg SETRUPHead.norm,
    backbone final_norm=False), 2 x C parameters (768 for ViT-S), the backbone's final norm frozen and unread; off
    (the default) the head is unchanged: no norm, reads the backbone's final-normed dense map."""
    bb, plain, mm = _pup_pair()
    c, last = bb.embed_dim, bb.num_blocks - 1
    assert not plain.input_norm and not hasattr(plain, "norm") and plain.needs_intermediates == ()
    assert mm.needs_intermediates == (last,) and mm.norm.eps == 1e-6
    assert sum(p.numel() for p in mm.parameters()) - sum(p.numel() for p in plain.parameters()) == 2 * c
    assert not any(p.requires_grad for p in bb.library_model.norm.parameters())
    assert all(p.requires_grad for n, p in bb.named_parameters() if not n.startswith("timm_model.norm."))
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        out = bb.forward_all(x, intermediates=(last,))
        raw = out.intermediates[0]
        # mmseg SETRUPHead.forward: (n, c, h, w) -> (n, hw, c) -> norm -> (n, c, h, w) -> up_convs -> cls_seg
        n, _, h, w = raw.shape
        want = mm.norm(raw.reshape(n, c, h * w).transpose(2, 1)).transpose(1, 2).reshape(n, c, h, w)
        for stage in mm.stages:
            want = torch.nn.functional.interpolate(stage(want), scale_factor=2, mode="bilinear", align_corners=False)
        torch.testing.assert_close(mm(out.dense, [raw]), mm.classifier(want))


def test_setr_pup_input_norm_equals_the_default_at_init_and_not_after_pretrained_weights():
    """Why the option exists: at initialisation (the backbone's final norm at weight 1, bias 0, eps 1e-6, like the
    head's fresh LayerNorm) both forms give the same logits; once pretrained weights give the final norm another
    affine transform (as every ImageNet / DINO checkpoint does), the default head sees it and mmseg's does not."""
    bb, plain, mm = _pup_pair()
    last = bb.num_blocks - 1
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        out = bb.forward_all(x, intermediates=(last,))
        torch.testing.assert_close(plain(out.dense), mm(out.dense, out.intermediates), atol=1e-5, rtol=1e-4)
        g = torch.Generator().manual_seed(1)
        fn = bb.library_model.norm
        fn.weight.copy_(1 + 0.5 * torch.randn(fn.weight.shape, generator=g))
        fn.bias.copy_(0.5 * torch.randn(fn.bias.shape, generator=g))
        out2 = bb.forward_all(x, intermediates=(last,))
        assert not torch.allclose(plain(out2.dense), plain(out.dense), atol=1e-3)
        torch.testing.assert_close(mm(out2.dense, out2.intermediates), mm(out.dense, out.intermediates))


@pytest.mark.parametrize("fusion", ["none", "features", "affinity"])
def test_head_input_norm_through_the_segmenter(fusion):
    """SegmentConfig.head_input_norm builds mmseg's form on ViT and Swin, with every fusion (fusion-1 channels join
    the normalised block output without being normalised); the default config builds the plain head; a head other
    than setr_pup is refused in one line; the head's norm trains without weight decay, the frozen final norm not."""
    from core.config import SegmentConfig
    from core.errors import ConfigError
    from core.models.segmenter import build_segmenter

    for name in (("vit_nano_patch8", "swin_nano") if fusion == "none" else ("vit_nano_patch8",)):
        cfg = SegmentConfig.from_dict({"backbone": name, "head": "setr_pup", "head_channels": 16, "fusion": fusion,
                                       "head_input_norm": True, "data": {"image_size": SIZE}})
        torch.manual_seed(0)
        m = build_segmenter(cfg, NUM_CLASSES).train()
        assert m.head.input_norm and m.head.norm.normalized_shape[0] == m.backbone.intermediate_dims([-1])[0]
        assert m.head.extra_in_channels == (m.fusion.out_channels if fusion == "features" else 0)
        logits = m(torch.randn(2, 3, SIZE, SIZE))
        assert logits.shape == (2, NUM_CLASSES, SIZE, SIZE)
        logits.sum().backward()
        assert m.head.norm.weight.grad is not None and m.head.norm.weight.grad.abs().sum() > 0
        groups = {g["name"]: {id(p) for p in g["params"]} for g in m.param_groups(1e-3, weight_decay=1e-4)}
        assert id(m.head.norm.weight) in groups["head_no_decay"]
        final = m.backbone.library_model.norm
        assert not any(id(p) in ids for ids in groups.values() for p in final.parameters())
    plain = build_segmenter(SegmentConfig.from_dict({"backbone": "vit_nano_patch8", "fusion": fusion,
                                                     "data": {"image_size": SIZE}}), NUM_CLASSES)
    assert plain.head.input_norm is False and not hasattr(plain.head, "norm")
    assert all(p.requires_grad for p in plain.backbone.parameters())
    with pytest.raises(ConfigError) as e:
        SegmentConfig.from_dict({"backbone": "resnet_tiny", "head": "deeplabv3", "head_input_norm": True})
    assert "head_input_norm=true" in str(e.value) and "head='deeplabv3'" in str(e.value) and "\n" not in str(e.value)
