"""Backbone wrappers (timm / torchvision / vit-pytorch) behind one `Backbone` contract."""

from core.models.backbones.base import Backbone, BackboneOutput

__all__ = ["Backbone", "BackboneOutput"]
