"""SETR-PUP auxiliary heads (SegmentConfig.aux_heads): built only when asked, on mmseg's blocks, trained
with main CE + 0.4 x aux CE, never used at inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.config import SegmentConfig
from core.errors import ConfigError
from core.models.heads.setr import AUX_LOSS_WEIGHT, SETRUPAuxHead, aux_blocks, aux_heads_refusal
from core.models.segmenter import build_segmenter, whole_inference

K = 4


def cfg(**kw) -> SegmentConfig:
    base = {"backbone": "vit_nano_patch8", "head": "setr_pup", "data": {"image_size": 32}}
    base.update(kw)
    return SegmentConfig.from_dict(base)


def test_aux_blocks_follow_mmseg_depths():
    assert aux_blocks(24) == (9, 14, 19)  # mmseg ViT-L out_indices (9, 14, 19, 23)
    assert aux_blocks(12) == (4, 6, 9)
    assert aux_blocks(4) == (0, 1, 2)
    assert aux_blocks(1) == ()
    for n in range(2, 40):
        b = aux_blocks(n)
        assert b and all(0 <= i < n - 1 for i in b) and list(b) == sorted(set(b))


def test_default_builds_no_aux_head():
    c = cfg()
    assert c.aux_heads is False
    m = build_segmenter(c, K)
    assert m.aux_heads is None and m.aux_blocks == ()
    assert not any("aux" in n for n, _ in m.named_parameters())


def test_head_channels_reach_main_and_aux_heads():
    """SegmentConfig.head_channels sets the conv width of the PUP stages and of each auxiliary head; none builds the
    reference 256-wide heads (the same parameter count as the default config)."""
    m = build_segmenter(cfg(aux_heads=True, head_channels=16), K)
    heads = [m.head, *m.aux_heads]
    assert all(st[0].out_channels == 16 and h.classifier.in_channels == 16 for h in heads for st in h.stages)
    n = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    ref = build_segmenter(cfg(aux_heads=True), K)
    assert all(st[0].out_channels == 256 for h in [ref.head, *ref.aux_heads] for st in h.stages)
    assert n(build_segmenter(cfg(aux_heads=True, head_channels=256), K)) == n(ref) > n(m)


def test_aux_heads_exist_only_when_asked_and_read_their_blocks():
    m = build_segmenter(cfg(aux_heads=True), K)
    assert len(m.aux_heads) == 3 and all(isinstance(h, SETRUPAuxHead) for h in m.aux_heads)
    assert m.aux_blocks == aux_blocks(m.backbone.num_blocks) == (0, 1, 2)
    # each head gets exactly its block's output from forward_all
    seen = []
    orig = m.backbone.forward_all

    def spy(x, intermediates=(), attention_blocks=()):
        out = orig(x, intermediates=intermediates, attention_blocks=attention_blocks)
        seen.append((tuple(intermediates), [t.detach().clone() for t in out.intermediates]))
        return out

    m.backbone.forward_all = spy
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    logits, aux = m(x, with_aux=True)
    asked, inters = seen[-1]
    assert asked == (0, 1, 2) and len(aux) == 3
    for h, f, a in zip(m.aux_heads, inters, aux):
        assert a.shape == (2, K, 32, 32)
        torch.testing.assert_close(a, h(None, [f], out_size=(32, 32)))
    m(x)
    assert seen[-1][0] == ()  # plain forward never asks for the aux blocks
    # every aux parameter is in the optimizer's head groups
    groups = m.param_groups(1e-3, weight_decay=1e-4)
    head_params = {id(p) for g in groups if g["name"].startswith("head") for p in g["params"]}
    assert all(id(p) in head_params for p in m.aux_heads.parameters())


def test_aux_heads_upsample_by_their_own_blocks_stride():
    """Each auxiliary head's two upsampling stages multiply to its block's stride: the patch size on a ViT (every
    block; mmseg's 4 x 4 at /16), 4, 8 and 16 on Swin's first three stages, so its native output is the input size
    (no oversized maps at Swin's shallow, fine stages)."""
    from core.models.heads.setr import block_stride

    for name, size, strides in (("vit_nano_patch8", 32, (8, 8, 8)), ("swin_nano", 64, (4, 8, 16))):
        m = build_segmenter(cfg(backbone=name, aux_heads=True, head_channels=8, data={"image_size": size}), K).eval()
        assert tuple(block_stride(m.backbone, b) for b in m.aux_blocks) == strides
        assert tuple(h.scales[0] * h.scales[1] for h in m.aux_heads) == strides
        x = torch.randn(1, 3, size, size)
        feats = m.backbone.forward_all(x, intermediates=m.aux_blocks)
        with torch.no_grad():
            for h, f in zip(m.aux_heads, feats.intermediates):
                assert h(None, [f]).shape[-2:] == (size, size), name  # native resolution = the input's


def test_gradients_reach_each_aux_head_and_backbone():
    m = build_segmenter(cfg(aux_heads=True), K).train()
    _, aux = m(torch.randn(2, 3, 32, 32), with_aux=True)
    for i, a in enumerate(aux):
        m.zero_grad(set_to_none=True)
        a.sum().backward(retain_graph=True)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.aux_heads[i].parameters())
        assert all(p.grad is None for j, h in enumerate(m.aux_heads) if j != i for p in h.parameters())
        assert m.backbone.timm_model.blocks[m.aux_blocks[i]].attn.qkv.weight.grad is not None


def test_training_loss_is_main_plus_0p4_aux():
    from core.methods.segmentation import SegmentationMethod

    torch.manual_seed(0)
    c = cfg(aux_heads=True, mode="finetune")
    method = SegmentationMethod(c, K, [str(i) for i in range(K)]).train()
    x = torch.randn(2, 3, 32, 32)
    y = torch.randint(0, K, (2, 32, 32))
    y[:, :4] = 255
    logits, aux = method.model(x, with_aux=True)
    main = F.cross_entropy(logits, y, ignore_index=255)
    aux_ce = [F.cross_entropy(a, y, ignore_index=255) for a in aux]
    assert AUX_LOSS_WEIGHT == 0.4 and len(aux_ce) == 3
    total, main2 = method.training_loss(logits, y, aux)
    torch.testing.assert_close(main2, main)
    torch.testing.assert_close(total, main + 0.4 * sum(aux_ce))
    # training_step computes the same total on the same batch (BatchNorm in eval to fix the statistics)
    method.eval()
    logits, aux = method.model(x, with_aux=True)
    expect = F.cross_entropy(logits, y, ignore_index=255) + 0.4 * sum(F.cross_entropy(a, y, ignore_index=255) for a in aux)
    method.log = lambda *a, **k: None
    torch.testing.assert_close(method.training_step((x, y), 0), expect)


def test_eval_output_identical_with_and_without_aux_heads():
    torch.manual_seed(0)
    plain = build_segmenter(cfg(), K)
    with_aux = build_segmenter(cfg(aux_heads=True), K)
    missing, unexpected = with_aux.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith("aux_heads.") for k in missing)
    plain.eval(), with_aux.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(with_aux(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(whole_inference(with_aux, x, size_divisor=8), whole_inference(plain, x, size_divisor=8),
                               rtol=0, atol=0)
    logits, _ = with_aux(x, with_aux=True)
    torch.testing.assert_close(logits, plain(x), rtol=0, atol=0)


def test_bad_values_give_one_line():
    with pytest.raises(ConfigError) as e:
        cfg(aux_heads=True, head="deeplabv3")
    assert str(e.value) == ("aux_heads=true is SETR-PUP's deep supervision and needs head=setr_pup, not "
                            "head='deeplabv3'; set aux_heads=false or head=setr_pup")
    assert "\n" not in str(e.value)
    c = cfg(aux_heads=True, backbone="resnet_tiny")
    with pytest.raises(ConfigError) as e:
        build_segmenter(c, K)
    assert str(e.value) == ("aux_heads=true reads intermediate transformer blocks but backbone resnet_tiny is a CNN; "
                            "set aux_heads=false or use a vit_* backbone")
    assert aux_heads_refusal("setr_pup", build_segmenter(cfg(), K).backbone) is None
    with pytest.raises(ConfigError, match="aux_heads="):
        cfg(aux_heads="maybe")


def test_run_with_aux_heads_and_its_refusal(tmp_path, voc_root):
    """End to end: a run with aux heads trains and writes a model.pt without them (inference only needs
    the main head); on a CNN the run is refused by the fit check before anything is written."""
    import torch

    from core.config import SegmentConfig
    from core.errors import ConfigError
    from core.runs.segment import run_segment

    base = {"head": "setr_pup", "aux_heads": True, "epochs": 1, "batch_size": 8, "wandb": "disabled",
            "device": "cpu", "data": {"root": str(voc_root), "image_size": 32, "limit_train": 8, "limit_val": 4}}
    m = run_segment(SegmentConfig.from_dict({**base, "backbone": "vit_nano_patch8"}), tmp_path / "vit",
                    progress=False)
    assert 0.0 <= m["mIoU"] <= 100.0
    sd = torch.load(tmp_path / "vit" / "model.pt", weights_only=True)["state_dict"]
    assert sd and not any(k.startswith("aux_heads.") for k in sd)
    with pytest.raises(ConfigError) as e:
        run_segment(SegmentConfig.from_dict({**base, "backbone": "resnet_tiny"}), tmp_path / "cnn", progress=False)
    assert "\n" not in str(e.value) and "aux_heads" in str(e.value)
    assert not (tmp_path / "cnn").exists()
