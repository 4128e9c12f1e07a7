"""VICReg pretraining (Bardes, Ponce, LeCun, ICLR 2022, "VICReg: Variance-Invariance-Covariance
Regularization for Self-Supervised Learning"), as the official main_vicreg.py: backbone + expander +
`core.losses.VICRegLoss`, with the Barlow Twins augmentation recipe (the official VICReg
augmentations.py is the same two asymmetric views).

The expander is `BarlowTwinsProjector` (Linear-BN-ReLU blocks, last Linear without bias, widths from
`PretrainConfig.projector`; official 8192-8192-8192). The official expander's hidden Linear layers
have a bias that the following BatchNorm cancels, so the two compute the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

from torch import Tensor, nn

from core.config import ConfigBase, check_positive
from core.losses.vicreg import VICRegLoss
from core.methods.barlow_twins import pair_views
from core.methods.registry import SSLMethodSpec
from core.methods.ssl_base import SSLMethod, unpack_views

if TYPE_CHECKING:
    from core.config import PretrainConfig


@dataclass(frozen=True)
class VICRegOptions(ConfigBase):
    """VICReg loss coefficients (`PretrainConfig.vicreg`); defaults are the paper's."""

    section = "vicreg"

    sim_coeff: float = 25.0
    """Weight of the invariance (mean squared error) term."""
    std_coeff: float = 25.0
    """Weight of the variance (std hinge) term."""
    cov_coeff: float = 1.0
    """Weight of the covariance (off-diagonal) term."""

    def validate(self) -> None:
        for name in ("sim_coeff", "std_coeff", "cov_coeff"):
            check_positive(f"vicreg.{name}", getattr(self, name), allow_zero=True)


class VICRegMethod(SSLMethod):
    method_name = "vicreg"

    def __init__(self, cfg: PretrainConfig, num_train_batches: int = 1, gpu_augment: Optional[Sequence] = None,
                 backbone: Optional[nn.Module] = None):
        super().__init__(cfg, num_train_batches, gpu_augment, backbone)
        from core.models.projector import BarlowTwinsProjector

        opts = cfg.vicreg
        self.projector = BarlowTwinsProjector(self.backbone.embed_dim, cfg.projector)
        self.loss_fn = VICRegLoss(opts.sim_coeff, opts.std_coeff, opts.cov_coeff)

    def forward(self, x: Tensor) -> Tensor:
        return self.projector(self.encoder()(x))

    def training_step(self, batch, batch_idx):
        views = unpack_views(batch)
        x1, x2 = self.prepare_view(views[0], 0), self.prepare_view(views[1], 1)
        z1, z2 = self(x1), self(x2)
        loss = self.loss_fn(z1, z2)
        bs = x1.shape[0]
        self.log_embedding_std("train/proj_std", z1.detach())  # collapse monitor of the expander output
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        for name, value in self.loss_fn.last_terms.items():  # unweighted invariance / variance / covariance
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=bs)
        return loss


METHOD = SSLMethodSpec(
    name="vicreg", label="VICReg", short="vicreg",
    paper="Bardes, Ponce, LeCun, VICReg: Variance-Invariance-Covariance Regularization for "
          "Self-Supervised Learning, ICLR 2022",
    options=VICRegOptions, module=VICRegMethod, views=pair_views, order=20,
)
