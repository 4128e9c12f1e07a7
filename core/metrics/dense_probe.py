"""Frozen dense linear probe: how linearly do a backbone's dense features segment, without fine-tuning?

`dense_probe(backbone, train_loader, val_loader, device, num_classes, steps)` -> val mIoU (%).

The head is the "linear" segmentation evaluation of DINOv2 (Oquab et al., 2023,
https://arxiv.org/abs/2304.07193, Sec. 7.4: "a linear layer is trained to predict class logits from
patch tokens ... used to produce a low-resolution logit map ... upsampled to full resolution"; their
code uses mmsegmentation's ``BNHead``: BatchNorm, then a 1x1 convolution whose logits are resized to
the label map and trained with cross-entropy, ignore index 255), fitted on a small, bounded budget:

- features: ``backbone.forward_dense(x)`` (B, C, h, w) of the FROZEN backbone (eval mode, no gradients),
  computed ONCE for the first ``max_train_images`` training images and cached;
- normalisation: BatchNorm WITHOUT affine parameters, its statistics those of the whole cached set
  (fixed per-channel mean / variance): the "BatchNorm without affine transformation" before the linear
  classifier of MAE's linear probing (He et al., 2022, https://arxiv.org/abs/2111.06377, Sec. A.2); the
  classifier stays linear in the features and one optimiser setting fits every feature scale;
- classifier: a 1x1 convolution C -> num_classes (zero-initialised), trained by full-batch L-BFGS
  (strong-Wolfe line search) for at most ``steps`` iterations -- the optimiser of the logistic-regression
  linear probes of CLIP (Radford et al., 2021, https://arxiv.org/abs/2103.00020, App. A.3: scikit-learn's
  L-BFGS). Measured on the generated data (64 px, 400 train images, random vit_nano_patch8 / resnet_tiny):
  100 AdamW steps reach 14-22 mIoU depending on the learning rate, L-BFGS reaches 29.0 / 21.0 in 50
  iterations against 30.2 / 21.6 at 300 (converged), at a third of the cost;
- loss: cross-entropy of the logits upsampled to each ORIGINAL mask with ``mode="nearest"`` (255
  ignored), computed exactly without materialising the upsampled map: the nearest upsampling gives every
  mask pixel the logits of one grid cell (``cell = floor(i * gh / H)``), so the loss is the
  pixel-count-weighted cross-entropy of each cell against the classes of its pixels (`cell_targets`).
  DINOv2 / mmseg train through a bilinear upsampling; nearest is the cheap exact variant (the CPU smoke
  runs evaluate twice per pretraining);
- scoring: on the val split, logits upsampled (bilinear, align_corners=False) to each ORIGINAL mask's
  H x W, argmax, `core.metrics.segmentation.SegmentationMetrics` (one confusion matrix over the split,
  255 ignored) -> mIoU in percent. Computed locally (no collective call: only rank 0 evaluates).

A fixed budget makes the number comparable between runs with the same settings (before / after
pretraining, one method against another), not a converged linear-probe figure. Chance level: a constant
predictor of class c scores IoU_c = share of c and 0 elsewhere, mIoU ~ 100 * p_c / classes present.

`METRICS` declares what a pretraining run writes from it (core/metrics/registry.py): `dense_probe_miou`
before and after pretraining, fitted on the k-NN train images with masks, scored on the k-NN val ones.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import DataError
from core.metrics.registry import AFTER, BEFORE, Column, EvalContext, MetricSpec
from core.stages import PRETRAIN

__all__ = ["dense_probe", "cell_targets", "cache_dense_features", "train_linear_probe", "score_probe",
           "MAX_TRAIN_IMAGES", "DEFAULT_STEPS"]

IGNORE = 255
#: training images whose features are cached (the probe's data bound)
MAX_TRAIN_IMAGES = 200
#: L-BFGS iterations (PretrainSettings.dense_probe_steps)
DEFAULT_STEPS = 50


def _split(batch: Any) -> tuple[Tensor, list]:
    if isinstance(batch, dict):
        return batch["image"], list(batch["mask"])
    return batch[0], list(batch[1])


def cell_targets(mask: Tensor, grid: tuple[int, int], num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """(cell index in the flattened (gh, gw) grid, class, pixel count) of every (cell, class) pair of
    ``mask`` (H, W) under nearest upsampling of the grid to H x W (``cell = floor(i * gh / H)``, PyTorch's
    ``interpolate(mode="nearest")``); 255 pixels left out. DataError for a label outside 0..num_classes-1."""
    mask = torch.as_tensor(mask).long()
    H, W = mask.shape[-2:]
    gh, gw = grid
    rows = torch.div(torch.arange(H, device=mask.device) * gh, H, rounding_mode="floor")
    cols = torch.div(torch.arange(W, device=mask.device) * gw, W, rounding_mode="floor")
    cell = rows[:, None] * gw + cols[None]
    valid = mask != IGNORE
    lab = mask[valid]
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
        bad = int(lab[(lab < 0) | (lab >= num_classes)][0])
        raise DataError(f"dense probe: mask value {bad} is outside the label space 0..{num_classes - 1} (and is not "
                        f"the ignore index {IGNORE}); fix the masks or the number of classes")
    key, count = torch.unique(cell[valid] * num_classes + lab, return_counts=True)
    return torch.div(key, num_classes, rounding_mode="floor"), key % num_classes, count


@torch.no_grad()
def cache_dense_features(backbone, loader: Iterable, device: Any = "cpu", max_images: Optional[int] = None,
                         num_classes: int = 21) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """(features (N, C, h, w) float32 CPU, targets (cell over the N*h*w cells, class, count)) of the first
    ``max_images`` images of ``loader`` (batches ``(images, masks)``, masks at any resolution)."""
    feats, cells, labels, counts, n = [], [], [], [], 0
    for batch in loader:
        x, ms = _split(batch)
        if max_images is not None:
            if n >= max_images:
                break
            x, ms = x[: max_images - n], ms[: max_images - n]
        f = backbone.forward_dense(x.to(device).float()).float().cpu()
        gh, gw = f.shape[-2:]
        for i, m in enumerate(ms):
            c, lab, cnt = cell_targets(torch.as_tensor(m).cpu(), (gh, gw), num_classes)
            cells.append(c + (n + i) * gh * gw)
            labels.append(lab)
            counts.append(cnt)
        feats.append(f)
        n += x.shape[0]
    if not feats:
        raise DataError("the dense probe got no training images; check the segmentation train split")
    return torch.cat(feats), (torch.cat(cells), torch.cat(labels), torch.cat(counts))


class _Probe(nn.Module):
    """Fixed per-channel standardisation (BatchNorm without affine, cached-set statistics) + 1x1 conv."""

    def __init__(self, mean: Tensor, var: Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1))
        self.register_buffer("inv_std", (var + 1e-5).rsqrt().reshape(1, -1, 1, 1))
        self.conv = nn.Conv2d(mean.numel(), num_classes, 1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, f: Tensor) -> Tensor:
        return self.conv((f - self.mean) * self.inv_std)


def train_linear_probe(feats: Tensor, targets: tuple[Tensor, Tensor, Tensor], num_classes: int,
                       steps: int = DEFAULT_STEPS, device: Any = "cpu") -> nn.Module:
    """The probe trained by at most ``steps`` full-batch L-BFGS iterations on cached ``feats`` (N, C, h, w)
    and the `cell_targets` of their masks (the exact nearest-upsampled cross-entropy, see the module doc)."""
    device = torch.device(device)
    mean = feats.mean((0, 2, 3))
    var = feats.var((0, 2, 3), unbiased=False)
    probe = _Probe(mean, var, num_classes).to(device)
    x = feats.to(device).permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    x = (x - probe.mean.flatten()) * probe.inv_std.flatten()
    cells, labels, counts = (t.to(device) for t in targets)
    w = counts.float() / counts.sum().clamp_min(1)
    if steps <= 0 or cells.numel() == 0:
        return probe.eval()
    lin = probe.conv
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=int(steps), history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        logits = x @ lin.weight.flatten(1).T + lin.bias
        loss = -(w * F.log_softmax(logits, 1)[cells, labels]).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return probe.eval()


@torch.no_grad()
def score_probe(backbone, probe: nn.Module, loader: Iterable, num_classes: int, device: Any = "cpu") -> Optional[float]:
    """Val mIoU (%) of ``probe`` on ``backbone``'s dense features, each logit map resized (bilinear) to its
    ORIGINAL mask; None when the split has no labelled pixel."""
    from core.metrics.segmentation import SegmentationMetrics

    metrics = SegmentationMetrics(num_classes, ignore_index=IGNORE)
    for batch in loader:
        x, ms = _split(batch)
        logits = probe(backbone.forward_dense(x.to(device).float()).float())
        for lg, m in zip(logits, ms):
            m = torch.as_tensor(m).long()
            up = F.interpolate(lg[None], size=tuple(m.shape[-2:]), mode="bilinear", align_corners=False)
            metrics.update(up.argmax(1).cpu(), m[None])
    if int(metrics.confusion.sum()) == 0:
        return None
    return float(metrics.compute(sync=False)["mIoU"])


def dense_probe(backbone, train_loader: Iterable, val_loader: Iterable, device: Any = "cpu", num_classes: int = 21,
                steps: int = DEFAULT_STEPS, max_train_images: Optional[int] = MAX_TRAIN_IMAGES) -> Optional[float]:
    """Val mIoU (%, 0-100) of a linear classifier trained on ``backbone``'s frozen dense features (module doc).
    Loaders yield ``(images (B,3,S,S), masks)`` (masks (B,H,W) or a list of (H_i,W_i), 255 = ignore)."""
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    try:
        feats, targets = cache_dense_features(backbone, train_loader, device, max_train_images, num_classes)
        probe = train_linear_probe(feats, targets, num_classes, steps, device)
        return score_probe(backbone, probe, val_loader, num_classes, device)
    finally:
        backbone.train(was_training)


def probe_score(ctx: EvalContext) -> Optional[float]:
    """`dense_probe` of an evaluation's backbone (computed once per evaluation); None without masks or with
    `dense_probe_steps` 0."""
    def run():
        masks = ctx.mask_loaders()
        if masks is None or ctx.cfg.dense_probe_steps <= 0:
            return None
        return dense_probe(ctx.backbone, masks[0], masks[1], ctx.device, num_classes=ctx.loaders.knn_num_classes,
                           steps=ctx.cfg.dense_probe_steps)

    return ctx.once("probe", run)


METRICS = (
    MetricSpec("dense_probe_miou", PRETRAIN.name,
               "val mIoU (%) of a linear classifier on the frozen dense features, fitted on the train masks with a "
               "bounded budget (core/metrics/dense_probe.py), after pretraining; null without masks or with "
               "dense_probe_steps 0", AFTER, compute=probe_score, order=40,
               columns=(Column("emerging", "Dense probe mIoU", 2, best=+1, position=40),)),
    MetricSpec("dense_probe_miou_init", PRETRAIN.name, "the same before pretraining", BEFORE, compute=probe_score,
               order=41),
)
