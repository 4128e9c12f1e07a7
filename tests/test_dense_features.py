"""core.diagnostics.dense_features: effective rank and local variance fraction of dense features."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from core.diagnostics.dense_features import (
    DenseMoments,
    dense_feature_stats,
    effective_rank,
    local_variance_fraction,
)
from core.errors import ConfigError
from core.models.backbones.base import BackboneOutput
from core.models.registry import create_backbone


def test_effective_rank_equals_entropy_of_singular_values():
    # rows centred by construction: singular values of z are known exactly (3, 2, 1, 0)
    centre = np.eye(8) - 1.0 / 8
    q = np.linalg.qr(centre @ np.random.default_rng(1).normal(size=(8, 4)))[0]  # centred orthonormal columns
    z = q @ np.diag([3.0, 2.0, 1.0, 0.0]) @ np.linalg.qr(np.random.default_rng(2).normal(size=(4, 4)))[0]
    p = np.array([3.0, 2.0, 1.0]) / 6.0
    expected = math.exp(-(p * np.log(p)).sum())
    assert effective_rank(torch.tensor(z)) == pytest.approx(expected, rel=1e-9)


def test_effective_rank_bounds():
    g = torch.Generator().manual_seed(0)
    iso = torch.randn(20000, 8, generator=g)
    assert 7.8 < effective_rank(iso) <= 8.0
    line = torch.randn(500, 1, generator=g, dtype=torch.float64) * torch.randn(1, 16, generator=g, dtype=torch.float64)
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(torch.ones(10, 4)) == 0.0  # no variance at all


def test_local_variance_fraction_extremes_and_formula():
    g = torch.Generator().manual_seed(0)
    per_image = torch.randn(6, 5, 1, 1, generator=g).expand(6, 5, 4, 4)
    assert local_variance_fraction(per_image) == pytest.approx(0.0, abs=1e-12)  # no spatial information
    local = torch.randn(6, 5, 4, 4, generator=g)
    local = local - local.mean((2, 3), keepdim=True)  # every image has the same (zero) mean
    assert local_variance_fraction(local) == pytest.approx(1.0)
    z = torch.randn(3, 2, 2, 3, generator=g, dtype=torch.float64)
    v = z.permute(0, 2, 3, 1).numpy().reshape(3, 6, 2)  # (image, position, channel)
    within = sum(((v[b] - v[b].mean(0)) ** 2).sum() for b in range(3))
    total = ((v.reshape(-1, 2) - v.reshape(-1, 2).mean(0)) ** 2).sum()
    assert local_variance_fraction(z) == pytest.approx(within / total, rel=1e-12)


def test_streaming_moments_equal_one_shot():
    g = torch.Generator().manual_seed(3)
    dense = torch.randn(10, 6, 3, 5, generator=g) + torch.randn(10, 6, 1, 1, generator=g)
    m = DenseMoments()
    for chunk in dense.split(3):
        m.update(chunk)
    r = m.result()
    vectors = dense.permute(0, 2, 3, 1).reshape(-1, 6)
    assert r["num_vectors"] == 150 and r["dim"] == 6
    assert r["effective_rank"] == pytest.approx(effective_rank(vectors), rel=1e-6)
    assert r["local_variance_fraction"] == pytest.approx(local_variance_fraction(dense), rel=1e-9)


class _Broadcast(nn.Module):
    """A 'backbone' whose dense map is its pooled vector copied to every position."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 4, 1)

    def forward_all(self, x):
        d = self.proj(x)
        pooled = d.mean((2, 3))
        return BackboneOutput(pooled=pooled, dense=pooled[:, :, None, None].expand_as(d))


def test_dense_feature_stats_on_backbones():
    torch.manual_seed(0)
    x = torch.randn(12, 3, 32, 32)
    assert dense_feature_stats(_Broadcast(), x)["local_variance_fraction"] == pytest.approx(0.0, abs=1e-9)
    bb = create_backbone("resnet_tiny", image_size=32).train()
    loader = [(x[:5], torch.zeros(5)), (x[5:], torch.zeros(7))]  # k-NN loader batches: (images, labels)
    r = dense_feature_stats(bb, loader, max_images=8)
    assert r["num_images"] == 8 and r["num_vectors"] == 8 * 4 * 4 and r["dim"] == bb.dense_dim
    assert 1.0 < r["effective_rank"] <= bb.dense_dim
    assert 0.0 < r["local_variance_fraction"] < 1.0
    assert bb.training  # mode restored
    # uint8 images and dict batches are read as the k-NN monitor reads them (knn_monitor.prepare_images)
    from core.methods.knn_monitor import prepare_images

    u8 = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    ref = dense_feature_stats(bb, prepare_images(u8))
    batches = [{"image": u8[:3], "label": torch.zeros(3)}, {"image": u8[3:], "label": torch.zeros(3)}]
    got = dense_feature_stats(bb, batches)
    assert got["effective_rank"] == pytest.approx(ref["effective_rank"], rel=1e-6)
    assert got["local_variance_fraction"] == pytest.approx(ref["local_variance_fraction"], rel=1e-6)


def test_dense_feature_stats_bad_inputs():
    bb = _Broadcast()
    with pytest.raises(ConfigError, match="max_images"):
        dense_feature_stats(bb, torch.randn(2, 3, 8, 8), max_images=0)
    with pytest.raises(ConfigError, match=r"\(B, 3, H, W\)"):
        dense_feature_stats(bb, [torch.randn(3, 8, 8)])
    with pytest.raises(ConfigError, match="at least 2"):
        dense_feature_stats(bb, [])
    with pytest.raises(ConfigError, match="N >= 2"):
        effective_rank(torch.randn(1, 4))
    with pytest.raises(ConfigError, match="h \\* w >= 2"):
        local_variance_fraction(torch.randn(2, 3, 1, 1))
