"""SegmentationMetrics (confusion matrix, mmseg definitions) and segmentation losses (ignore 255)."""

from __future__ import annotations

import math

import pytest
import torch

from core.errors import ConfigError, DataError
from core.losses.segmentation import build_seg_loss
from core.metrics import SegmentationMetrics


def test_hand_computed_confusion_with_ignore_and_absent_class():
    # 4 classes; class 3 appears neither in truth nor prediction -> excluded (nan).
    target = torch.tensor([[0, 0, 1, 1],
                           [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 0, 0, 1]])  # the two ignored pixels predict 0 and 1: not counted
    m = SegmentationMetrics(4)
    m.update(pred[None], target[None])
    expected = torch.tensor([[1, 1, 0, 0],
                             [0, 2, 0, 0],
                             [1, 0, 1, 0],
                             [0, 0, 0, 0]])
    assert torch.equal(m.confusion.cpu(), expected)
    r = m.compute()
    # aAcc = 4 / 6; IoU0 = 1/(2+2-1) = 1/3; IoU1 = 2/(2+3-2) = 2/3; IoU2 = 1/(2+1-1) = 1/2
    assert r["aAcc"] == pytest.approx(400 / 6)
    assert r["IoU"][:3] == pytest.approx([100 / 3, 200 / 3, 50])
    assert math.isnan(r["IoU"][3])
    assert r["mIoU"] == pytest.approx((100 / 3 + 200 / 3 + 50) / 3)
    # Acc0 = 1/2, Acc1 = 2/2, Acc2 = 1/2 ; class 3 absent from truth -> nan
    assert r["mAcc"] == pytest.approx((50 + 100 + 50) / 3)
    assert math.isnan(r["Acc"][3])
    assert r["n_pixels"] == 6


def test_predicted_but_absent_class_counts_as_zero_iou():
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    pred = torch.tensor([[[0, 0], [0, 1]]])
    m = SegmentationMetrics(3)
    m.update(pred, target)
    r = m.compute()
    assert r["IoU"][0] == pytest.approx(75.0)
    assert r["IoU"][1] == 0.0  # predicted, never true: in the mean (mmseg)
    assert math.isnan(r["IoU"][2])
    assert r["mIoU"] == pytest.approx(37.5)
    assert r["mAcc"] == pytest.approx(75.0)  # only class 0 is in the truth


def test_perfect_prediction_and_logits_input():
    torch.manual_seed(0)
    target = torch.randint(0, 5, (2, 8, 8))
    target[0, 0, :4] = 255
    logits = torch.nn.functional.one_hot(target.clamp(max=4), 5).permute(0, 3, 1, 2).float()
    m = SegmentationMetrics(5)
    m.update(logits, target)
    r = m.compute()
    assert r["aAcc"] == 100.0 and r["mIoU"] == 100.0 and r["mAcc"] == 100.0
    assert r["n_pixels"] == 2 * 64 - 4


def test_accumulate_merge_reset_match_single_pass():
    torch.manual_seed(1)
    target = torch.randint(0, 4, (4, 6, 6))
    target[target == 3] = 255
    pred = torch.randint(0, 4, (4, 6, 6))
    whole = SegmentationMetrics(4)
    whole.update(pred, target)
    a, b = SegmentationMetrics(4), SegmentationMetrics(4)
    a.update(pred[:1], target[:1])
    a.update(pred[1:2], target[1:2])
    b.update(pred[2:], target[2:])
    assert torch.equal(a.merge(b).confusion, whole.confusion)
    ra, rw = a.compute(), whole.compute()
    for key in ("aAcc", "mIoU", "mAcc", "IoU", "Acc"):
        assert ra[key] == pytest.approx(rw[key], nan_ok=True)
    state = whole.state_dict()
    c = SegmentationMetrics(4)
    c.load_state_dict(state)
    assert torch.equal(c.confusion, whole.confusion)
    whole.reset()
    assert whole.confusion.sum() == 0 and math.isnan(whole.compute()["aAcc"])


def test_bad_mask_value_is_a_data_error():
    m = SegmentationMetrics(3)
    with pytest.raises(DataError, match="mask value 7 is outside the label space 0..2"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 7], [1, 255]]]))


# ---------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("name", ["ce", "dice", "focal"])
def test_losses_ignore_255(name):
    torch.manual_seed(0)
    k = 4
    loss_fn = build_seg_loss(name, k)
    logits = torch.randn(2, k, 8, 8, requires_grad=True)
    target = torch.randint(0, k, (2, 8, 8))
    target[:, :3] = 255
    base = loss_fn(logits, target)
    assert torch.isfinite(base) and base > 0
    changed = logits.detach().clone()
    changed[:, :, :3] = torch.randn(2, k, 3, 8) * 10  # only ignored pixels change
    assert torch.allclose(loss_fn(changed, target), base.detach(), atol=1e-6)
    changed[:, 0, 5] += 3.0  # a valid pixel changes -> the loss changes
    assert not torch.allclose(loss_fn(changed, target), base.detach())
    base.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[:, :, :3].abs().sum() == 0


@pytest.mark.parametrize("name", ["ce", "dice", "focal"])
def test_losses_all_ignored_is_zero_not_nan(name):
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    out = build_seg_loss(name, 3)(logits, torch.full((1, 4, 4), 255))
    assert out.item() == 0.0
    out.backward()


def test_ce_matches_torch_and_perfect_dice_is_zero():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 5)
    target = torch.randint(0, 3, (2, 5, 5))
    target[0, 0] = 255
    ref = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(build_seg_loss("ce", 3)(logits, target), ref)
    perfect = torch.nn.functional.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 100
    assert build_seg_loss("dice", 3)(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    assert build_seg_loss("focal", 3)(perfect, target).item() == pytest.approx(0.0, abs=1e-6)


def test_unknown_loss():
    with pytest.raises(ConfigError, match="loss='bce' is not known; choose one of: ce, dice, focal"):
        build_seg_loss("bce", 3)
