"""Segmenter assembly from SegmentConfig, frozen/fine-tune modes, optimizer groups, inference modes,
and the E1..E5 evaluation presets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.config import SegmentConfig
from core.errors import ConfigError
from core.evaluations import EVALUATIONS, apply_evaluation, get_evaluation
from core.models.heads.fusion import AttentionAffinityFusion, AttentionFeatureFusion
from core.models.segmenter import build_segmenter, slide_inference, whole_inference

pytest.importorskip("core.models.registry")

K = 4


def cfg(**kw) -> SegmentConfig:
    return SegmentConfig.from_dict(kw)


def small_kw(head):
    return {"channels": 32} if head in ("setr_naive", "setr_pup") else {}


@pytest.mark.parametrize("fusion", ["none", "features", "affinity"])
def test_build_vit_with_each_fusion(fusion):
    torch.manual_seed(0)
    c = cfg(backbone="vit_nano_patch8", head="setr_pup", fusion=fusion, fusion_blocks=2, fusion_steps=2,
            fusion_alpha=0.3)
    model = build_segmenter(c, K, **small_kw("setr_pup"))
    if fusion == "features":
        assert isinstance(model.fusion, AttentionFeatureFusion)
        assert model.head.extra_in_channels == model.backbone.num_heads * 2
    elif fusion == "affinity":
        assert isinstance(model.fusion, AttentionAffinityFusion) and model.fusion.steps == 2
        assert float(model.fusion.alpha.detach()) == pytest.approx(0.3)
    else:
        assert model.fusion is None and model.attention_blocks == ()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, K, 64, 64)


def test_build_resnet_deeplab_and_refusals():
    model = build_segmenter(cfg(backbone="resnet_tiny", head="deeplabv3"), K)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, K, 64, 64)
    with pytest.raises(ConfigError) as e:
        build_segmenter(cfg(backbone="resnet_tiny", head="deeplabv3", fusion="affinity"), K)
    assert str(e.value) == ("fusion='affinity' needs a transformer backbone with self-attention; resnet_tiny is a "
                            "CNN — use fusion=none or a vit_* backbone")
    with pytest.raises(ConfigError, match="fusion_blocks=2: fusion 1 on swin_nano reads the last stage's last block only"):
        build_segmenter(cfg(backbone="swin_nano", head="linear", fusion="features", fusion_blocks=2), K)
    with pytest.raises(ConfigError, match="fusion_blocks=9"):
        build_segmenter(cfg(backbone="vit_nano_patch8", head="linear", fusion="features", fusion_blocks=9), K)


def test_build_with_given_backbone_is_used():
    from core.models.registry import create_backbone

    bb = create_backbone("vit_nano_patch8", image_size=64)
    model = build_segmenter(cfg(head="linear"), K, backbone=bb)
    assert model.backbone is bb


def test_frozen_mode_and_param_groups():
    c = cfg(backbone="vit_nano_patch8", head="linear", fusion="affinity", mode="frozen")
    model = build_segmenter(c, K)
    model.train()
    assert model.frozen and not model.backbone.training and model.head.training
    assert all(not p.requires_grad for p in model.backbone.parameters())
    groups = model.param_groups(lr=0.01, backbone_lr_scale=0.1, weight_decay=1e-4, gate_lr=0.05)
    assert {g["name"] for g in groups} == {"head", "head_no_decay", "fusion_gate"}
    gate = next(g for g in groups if g["name"] == "fusion_gate")
    assert gate["params"] == [model.fusion.alpha_logit] and gate["weight_decay"] == 0.0 and gate["lr"] == 0.05
    assert not any(p is model.fusion.alpha_logit for g in groups if g is not gate for p in g["params"])
    assert next(g for g in model.param_groups(lr=0.01) if g["name"] == "fusion_gate")["lr"] == 0.01  # default: lr
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.fusion.alpha_logit.grad is not None

    ft = build_segmenter(c.replace(mode="finetune"), K)
    groups = ft.param_groups(lr=0.01, backbone_lr_scale=0.1, weight_decay=1e-4)
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone"]["lr"] == pytest.approx(0.001) and by_name["head"]["lr"] == 0.01
    assert by_name["backbone_no_decay"]["weight_decay"] == 0.0
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in ft.parameters() if p.requires_grad)
    torch.optim.AdamW(groups)  # groups are valid optimizer input
    assert {g["name"] for g in ft.param_groups(0.01, 0.0)} == {"head", "head_no_decay", "fusion_gate"}


def _gate_after_training(gate_lr: float, steps: int = 40) -> float:
    """Fusion 2 on a random ViT (near-uniform attention: propagation only blurs) fitted to a fixed
    label map for `steps` AdamW steps; returns the learned a."""
    torch.manual_seed(0)
    model = build_segmenter(cfg(backbone="vit_nano_patch8", head="linear", fusion="affinity", mode="frozen",
                                fusion_alpha=0.5), K)
    opt = torch.optim.AdamW(model.param_groups(lr=1e-2, gate_lr=gate_lr))
    x = torch.randn(4, 3, 64, 64)
    y = torch.arange(64).div(16, rounding_mode="floor").view(1, 1, 64).expand(4, 64, 64)  # 4 vertical bands
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return float(model.fusion.alpha.detach())


def test_fusion_gate_learns_to_close_when_attention_only_blurs():
    # With uniform attention, A L is the image mean of L: mixing it in only hurts, so a must fall.
    # At the gate lr (0.05) it does within 40 steps; at the head lr it barely moves (why the gate has
    # its own lr: SegmentConfig.fusion_alpha_lr).
    assert _gate_after_training(0.05) < 0.2
    assert _gate_after_training(1e-3) > 0.45


# ---------------------------------------------------------------------------------- inference
class PointwiseModel(nn.Module):
    """Translation-equivariant toy segmenter: a 1x1 convolution (each pixel sees only itself)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, K, 1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("hw,crop,stride", [((50, 70), 32, 20), ((64, 64), 32, 32), ((20, 24), 32, 16),
                                            ((40, 30), (24, 32), (16, 10))])
def test_slide_equals_whole_on_pointwise_model(hw, crop, stride):
    torch.manual_seed(0)
    model = PointwiseModel().eval()
    image = torch.randn(2, 3, *hw)
    whole = whole_inference(model, image)
    slide = slide_inference(model, image, crop, stride, K)
    assert slide.shape == whole.shape == (2, K, *hw)
    assert torch.allclose(slide, whole, atol=1e-6)


def test_slide_averages_overlapping_windows():
    class WindowCounter(nn.Module):  # outputs 1 everywhere: the average over windows must be 1
        def forward(self, x):
            return torch.ones(x.shape[0], K, *x.shape[-2:])

    out = slide_inference(WindowCounter(), torch.zeros(1, 3, 50, 50), 32, 9, K)
    assert torch.allclose(out, torch.ones_like(out))


def test_whole_and_slide_inference_on_vit_segmenter():
    model = build_segmenter(cfg(backbone="vit_nano_patch8", head="linear"), K).eval()
    image = torch.randn(1, 3, 60, 60)  # not a multiple of the patch size: padded, then cropped back
    out = whole_inference(model, image, size_divisor=8)
    assert out.shape == (1, K, 60, 60)
    out = slide_inference(model, torch.randn(1, 3, 80, 96), 64, 48, K)
    assert out.shape == (1, K, 80, 96) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------- presets
def test_presets_resolve_to_valid_configs():
    assert list(EVALUATIONS) == ["E1", "E2", "E3", "E4", "E5"]
    expect = {"E1": ("resnet50", "deeplabv3", "none"), "E2": ("vit_small_patch16", "setr_pup", "none"),
              "E3": ("vit_small_patch16", "setr_pup", "features"),
              "E4": ("vit_small_patch16", "setr_pup", "affinity"),
              "E5": ("vit_small_patch16", "setr_pup", "affinity")}
    for name, (bb, head, fusion) in expect.items():
        preset = get_evaluation(name)
        assert preset["description"] and "\n" not in preset["description"]
        assert preset["pretrain_method"] == ("dino" if name == "E5" else "barlow_twins")
        c = SegmentConfig.from_dict(apply_evaluation({}, name))
        assert (c.evaluation, c.backbone, c.head, c.fusion) == (name, bb, head, fusion)
    assert SegmentConfig.from_dict(apply_evaluation({}, "E5")).source == "dino"


def test_explicit_values_win_over_preset():
    d = apply_evaluation({"evaluation": "E4", "backbone": "vit_nano_patch8", "fusion_steps": 3, "head": None})
    assert d["backbone"] == "vit_nano_patch8" and d["fusion"] == "affinity" and d["head"] == "setr_pup"
    assert d["fusion_steps"] == 3 and d["evaluation"] == "E4"
    assert apply_evaluation({"fusion": "none"}, "E3")["fusion"] == "none"
    assert apply_evaluation({"lr": 0.1}) == {"lr": 0.1}  # no evaluation: unchanged
    with pytest.raises(ConfigError, match="evaluation='E9' is not known; choose one of: E1, E2, E3, E4, E5"):
        apply_evaluation({}, "E9")


@pytest.mark.parametrize("name,backbone", [("E1", "resnet_tiny"), ("E3", "vit_nano_patch8"),
                                           ("E4", "vit_nano_patch8")])
def test_presets_build_on_tiny_backbones(name, backbone):
    d = apply_evaluation({"backbone": backbone}, name)
    model = build_segmenter(SegmentConfig.from_dict(d), K, **small_kw(d["head"]))
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, K, 64, 64)
