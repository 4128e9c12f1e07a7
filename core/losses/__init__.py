"""Losses. Stable names: `cross_correlation`, `BarlowTwinsLoss`, `DINOLoss`, `VICRegLoss`."""

from core.losses.barlow_twins import BarlowTwinsLoss, cc_statistics, cross_correlation, off_diagonal
from core.losses.vicreg import VICRegLoss

__all__ = ["BarlowTwinsLoss", "cross_correlation", "cc_statistics", "off_diagonal", "DINOLoss", "VICRegLoss"]


def __getattr__(name):  # DINOLoss lives in its own module (written with the DINO method)
    if name == "DINOLoss":
        from core.losses.dino import DINOLoss

        return DINOLoss
    raise AttributeError(name)
