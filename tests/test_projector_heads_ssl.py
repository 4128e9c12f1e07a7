"""Barlow Twins projector and DINO head: official structure, weight norm, and a tiny SSL step."""

import pytest
import torch
from torch import nn

from core.errors import ConfigError
from core.models import create_backbone
from core.models.dino_head import DINOHead
from core.models.projector import BarlowTwinsProjector


def test_projector_official_structure():
    p = BarlowTwinsProjector(96, dims=(64, 48, 32))
    kinds = [type(m) for m in p]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    linears = [m for m in p if isinstance(m, nn.Linear)]
    assert all(m.bias is None for m in linears)
    assert [(m.in_features, m.out_features) for m in linears] == [(96, 64), (64, 48), (48, 32)]
    assert all(m.affine for m in p if isinstance(m, nn.BatchNorm1d))
    assert p.out_dim == 32 and p.in_dim == 96
    assert p(torch.randn(4, 96)).shape == (4, 32)
    assert "0.weight" in p.state_dict()  # same keys as the official nn.Sequential projector


def test_projector_default_official_widths_and_single_layer():
    p = BarlowTwinsProjector(2048)
    assert [m.out_features for m in p if isinstance(m, nn.Linear)] == [8192, 8192, 8192]
    one = BarlowTwinsProjector(16, dims=(8,))
    assert len(one) == 1 and isinstance(one[0], nn.Linear) and one[0].bias is None
    with pytest.raises(ConfigError):
        BarlowTwinsProjector(16, dims=(8, 0))
    with pytest.raises(ConfigError):
        BarlowTwinsProjector(16, dims=())


def test_dino_head_structure_and_weight_norm():
    h = DINOHead(96, 512, hidden=128, bottleneck=32)
    kinds = [type(m) for m in h.mlp]
    assert kinds == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert h.mlp[-1].out_features == 32
    ll = h.last_layer
    assert ll.bias is None
    assert hasattr(ll, "parametrizations") and hasattr(ll.parametrizations, "weight")
    g = ll.parametrizations.weight.original0
    assert g.shape == (512, 1)
    assert torch.all(g == 1) and not g.requires_grad
    # with g == 1 every output unit's weight row has unit norm
    assert torch.allclose(ll.weight.norm(dim=1), torch.ones(512), atol=1e-5)
    out = h(torch.randn(3, 96))
    assert out.shape == (3, 512)
    out.sum().backward()
    assert g.grad is None and ll.parametrizations.weight.original1.grad is not None
    # the bottleneck output is L2-normalised before the last layer, so |logit| <= 1
    assert out.abs().max() <= 1 + 1e-5


def test_dino_head_trainable_norm_and_options():
    h = DINOHead(16, 64, hidden=32, bottleneck=8, norm_last_layer=False)
    assert h.last_layer.parametrizations.weight.original0.requires_grad
    h1 = DINOHead(16, 64, hidden=32, bottleneck=8, nlayers=1)
    assert isinstance(h1.mlp, nn.Linear) and h1.mlp.out_features == 8
    hb = DINOHead(16, 64, hidden=32, bottleneck=8, use_bn=True)
    assert any(isinstance(m, nn.BatchNorm1d) for m in hb.mlp)
    with pytest.raises(ConfigError):
        DINOHead(16, 0)


def _bt_loss(z1, z2, lambd=0.0051):
    n = z1.shape[0]
    bn = nn.BatchNorm1d(z1.shape[1], affine=False)
    c = bn(z1).T @ bn(z2) / n
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = (c - torch.diag(torch.diagonal(c))).pow(2).sum()
    return on + lambd * off


@pytest.mark.parametrize("name", ["resnet_tiny", "vit_nano_patch8", "swin_nano"])
def test_tiny_ssl_step_backbone_projector(name):
    torch.manual_seed(0)
    s = 32  # the smallest size every tiny backbone accepts (Swin: multiple of 32)
    b = create_backbone(name, image_size=s).train()
    p = BarlowTwinsProjector(b.embed_dim, dims=(64, 64))
    opt = torch.optim.Adam(list(b.parameters()) + list(p.parameters()), lr=1e-3)
    x = torch.randn(8, 3, s, s)
    v1, v2 = x + 0.05 * torch.randn_like(x), x + 0.05 * torch.randn_like(x)
    losses = []
    for _ in range(3):
        z1, z2 = p(b(v1)), p(b(v2))
        loss = _bt_loss(z1, z2)
        opt.zero_grad()
        loss.backward()
        first = next(b.parameters())
        assert first.grad is not None and first.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_dino_head_on_backbone_features():
    b = create_backbone("vit_nano_patch8", image_size=32)
    h = DINOHead(b.embed_dim, 256, hidden=64, bottleneck=32)
    out = h(b(torch.randn(4, 3, 32, 32)))
    assert out.shape == (4, 256)
