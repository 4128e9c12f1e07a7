"""Frozen dense linear probe: the per-cell targets give exactly the cross-entropy of nearest-upsampled logits
against the full-resolution masks (255 ignored); separable features score near 100, random features near
the constant predictor's chance level; bad labels are refused in one line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.errors import DataError
from core.metrics.dense_probe import cell_targets, dense_probe


@pytest.mark.parametrize("hw,grid", [((16, 16), (4, 4)), ((15, 10), (4, 3)), ((7, 9), (8, 8))])
def test_cell_targets_give_the_cross_entropy_of_nearest_upsampled_logits(hw, grid):
    g = torch.Generator().manual_seed(0)
    K = 5
    mask = torch.randint(0, K, hw, generator=g)
    mask[0, :3] = 255
    logits = torch.randn(1, K, *grid, generator=g)
    ref = F.cross_entropy(F.interpolate(logits, size=hw, mode="nearest"), mask[None], ignore_index=255)
    cells, labels, counts = cell_targets(mask, grid, K)
    lp = F.log_softmax(logits[0].flatten(1).T, 1)  # (cells, K)
    ours = -(counts * lp[cells, labels]).sum() / counts.sum()
    assert torch.allclose(ours, ref, atol=1e-6)
    assert int(counts.sum()) == int((mask != 255).sum())


def test_cell_targets_refuse_a_label_outside_the_classes():
    mask = torch.zeros(4, 4, dtype=torch.long)
    mask[1, 1] = 30
    with pytest.raises(DataError, match="mask value 30 is outside the label space 0..20") as e:
        cell_targets(mask, (2, 2), 21)
    assert "\n" not in str(e.value)


class _Identity(torch.nn.Module):
    """A 'backbone' whose dense features are its input (the loaders below yield features as images)."""

    def forward_dense(self, x):
        return x


def _quadrant_data(n, separable, seed, K=4, cells=4, px=4):
    """n images on a (cells x cells) grid, masks (cells*px)^2: background 0 with one object class in one
    quadrant; features = one-hot class per cell + noise (separable) or pure noise."""
    g = torch.Generator().manual_seed(seed)
    feats, masks = [], []
    half = cells // 2
    for _ in range(n):
        lab = torch.zeros(cells, cells, dtype=torch.long)
        q = int(torch.randint(4, (1,), generator=g))
        c = 1 + int(torch.randint(K - 1, (1,), generator=g))
        r0, c0 = (q // 2) * half, (q % 2) * half
        lab[r0:r0 + half, c0:c0 + half] = c
        noise = 0.1 * torch.randn(K, cells, cells, generator=g)
        f = F.one_hot(lab, K).permute(2, 0, 1).float() + noise if separable else torch.randn(K, cells, cells,
                                                                                             generator=g)
        feats.append(f)
        masks.append(lab.repeat_interleave(px, 0).repeat_interleave(px, 1))
    feats, masks = torch.stack(feats), torch.stack(masks)
    return [(feats[i:i + 16], list(masks[i:i + 16])) for i in range(0, n, 16)], masks


def test_probe_on_separable_features_is_near_100_and_on_random_features_near_chance():
    tr, _ = _quadrant_data(64, True, 0)
    va, _ = _quadrant_data(32, True, 1)
    good = dense_probe(_Identity(), tr, va, num_classes=4, steps=50)
    assert good >= 90.0

    tr, _ = _quadrant_data(64, False, 0)
    va, vmasks = _quadrant_data(32, False, 1)
    bad = dense_probe(_Identity(), tr, va, num_classes=4, steps=50)
    # chance: the constant predictor of the majority class (background, 75% of the pixels)
    present = len(torch.unique(vmasks))
    chance = 100.0 * float((vmasks == 0).float().mean()) / present
    assert bad < chance + 8.0, (bad, chance)
    assert good > bad + 50.0


def test_probe_bounds_its_train_images_and_restores_the_mode():
    tr, _ = _quadrant_data(64, True, 0)
    va, _ = _quadrant_data(16, True, 1)
    bb = _Identity().train()
    # four training images are enough for these features; fewer than a batch is honoured
    assert dense_probe(bb, tr, va, num_classes=4, steps=30, max_train_images=4) >= 80.0
    assert bb.training


def test_pretraining_without_masks_writes_null(voc_data_cfg):
    """Images without masks (an imagefolder k-NN split): no loader with masks, both dense evaluations null."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, TensorDataset

    from core.data.module import KNNDataset, data_root, knn_mask_loader
    from core.data.voc import VOCSegmentation
    from core.runs.pretrain import dense_evaluations

    plain = DataLoader(TensorDataset(torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)), batch_size=2)
    assert knn_mask_loader(plain) is None and knn_mask_loader(None) is None
    loaders = SimpleNamespace(knn_train=plain, knn_val=plain, knn_num_classes=2)
    assert dense_evaluations(_Identity(), loaders, None, "cpu") == {"attn": None, "probe": None}
    # a k-NN loader over a segmentation dataset: the same images, in order, with their original masks
    seg = VOCSegmentation(data_root(voc_data_cfg), "val", limit=3)
    knn = DataLoader(KNNDataset(seg, 32), batch_size=2)
    x, masks = next(iter(knn_mask_loader(knn)))
    assert torch.equal(x, next(iter(knn))[0]) and len(masks) == 2
    assert torch.equal(masks[0], torch.as_tensor(seg[0][1]).long())
