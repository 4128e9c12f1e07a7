"""Barlow Twins pretraining (Zbontar et al., ICML 2021), official recipe: backbone +
`BarlowTwinsProjector` + `BarlowTwinsLoss` (core/losses/barlow_twins.py), two asymmetric views
(`core.data.transforms.BarlowTwinsTransform`). Shared plumbing: core/methods/ssl_base.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import Tensor, nn

from core.config import ConfigBase, check_positive
from core.losses.barlow_twins import BarlowTwinsLoss, cc_statistics, cross_correlation, off_diagonal
from core.metrics.registry import Column
from core.methods.registry import SSLMethodSpec
from core.methods.ssl_base import SSLMethod, unpack_views

if TYPE_CHECKING:
    from core.config import PretrainConfig


@dataclass(frozen=True)
class BarlowTwinsOptions(ConfigBase):
    """Barlow Twins loss options (`PretrainConfig.barlow_twins`)."""

    section = "barlow_twins"

    lambd: float = field(default=0.0051, metadata={"cli_aliases": ("lambd",)})
    """Weight of the off-diagonal (redundancy reduction) term; official 0.0051. A grid axis."""
    scale: float = 1.0
    """Factor on the whole loss (official 1.0; some reimplementations use 1/32)."""

    def validate(self) -> None:
        check_positive("barlow_twins.lambd", self.lambd, allow_zero=True)
        check_positive("barlow_twins.scale", self.scale)


def pair_views(cfg: PretrainConfig, gpu_augment: bool):
    """The official asymmetric two-view recipe (other methods that use it point their `views` here)."""
    from core.data.transforms import BarlowTwinsTransform

    return BarlowTwinsTransform(cfg.data.image_size, gpu_augment=gpu_augment, scale=cfg.data.ssl_crop_scale())


class BarlowTwinsMethod(SSLMethod):
    """Backbone + BarlowTwinsProjector + BarlowTwinsLoss (`self.loss_fn`, whose `last_cc` the
    cross-correlation diagnostic reads)."""

    method_name = "barlow_twins"
    result_keys = {
        "lambd": "Barlow Twins off-diagonal weight lambda (barlow_twins.lambd)",
        "cc_diag_mean": "Barlow Twins: mean diagonal of the cross-correlation on one training batch after training",
        "cc_offdiag_rms": "Barlow Twins: RMS of its off-diagonal entries",
    }
    result_columns = {  # their report columns (core/metrics/registry.py)
        "cc_diag_mean": Column("pretraining", "C diag mean", 3, position=60),
        "cc_offdiag_rms": Column("pretraining", "C off-diag RMS", 4, position=61),
    }

    def __init__(self, cfg: PretrainConfig, num_train_batches: int = 1, gpu_augment: Optional[Sequence] = None,
                 backbone: Optional[nn.Module] = None):
        super().__init__(cfg, num_train_batches, gpu_augment, backbone)
        from core.models.projector import BarlowTwinsProjector

        self.projector = BarlowTwinsProjector(self.backbone.embed_dim, cfg.projector)
        self.loss_fn = BarlowTwinsLoss(cfg.barlow_twins.lambd, cfg.barlow_twins.scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.projector(self.encoder()(x))

    def training_step(self, batch, batch_idx):
        views = unpack_views(batch)
        x1, x2 = self.prepare_view(views[0], 0), self.prepare_view(views[1], 1)
        z1, z2 = self(x1), self(x2)
        loss = self.loss_fn(z1, z2)
        c = self.loss_fn.last_cc
        bs = x1.shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        self.log("train/cc_diag_mean", torch.diagonal(c).mean(), on_step=False, on_epoch=True, batch_size=bs)
        self.log("train/cc_offdiag_rms", off_diagonal(c).pow(2).mean().sqrt(), on_step=False, on_epoch=True,
                 batch_size=bs)
        self.log_embedding_std("train/proj_std", z1.detach())  # collapse monitor of the projector output
        return loss

    @torch.no_grad()
    def result_metrics(self, loader, device) -> dict:
        """lambda, and the cross-correlation statistics of the trained model on one fresh training
        batch (two augmented views, eval mode), on this process' batch alone."""
        out = {"lambd": self.cfg.barlow_twins.lambd, "cc_diag_mean": None, "cc_offdiag_rms": None}
        was = self.training
        self.eval()
        try:
            for batch in loader:
                x1, x2 = (self.prepare_view(v.to(device), i) for i, v in enumerate(unpack_views(batch)[:2]))
                out.update(cc_statistics(cross_correlation(self(x1), self(x2), gather=False)))
                break
        finally:
            self.train(was)
        return out

    def diagnostic_callbacks(self, every_n_epochs: int) -> list:
        from core.diagnostics.callbacks import CrossCorrelationCallback

        return [CrossCorrelationCallback(every_n_epochs=every_n_epochs)]


METHOD = SSLMethodSpec(
    name="barlow_twins", label="Barlow Twins", short="bt",
    paper="Zbontar et al., Barlow Twins: Self-Supervised Learning via Redundancy Reduction, ICML 2021",
    options=BarlowTwinsOptions, module=BarlowTwinsMethod, views=pair_views, axes={"lambd": "l"}, order=0,
)
