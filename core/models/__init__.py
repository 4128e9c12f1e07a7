"""Models: backbones (registry), projector, DINO head, segmentation heads."""

from core.models.backbones.base import Backbone, BackboneOutput
from core.models.registry import (BACKBONES, TINY_BACKBONES, check_backbone_name, create_backbone,
                                  list_backbones)

__all__ = ["Backbone", "BackboneOutput", "BACKBONES", "TINY_BACKBONES", "check_backbone_name",
           "create_backbone", "list_backbones"]
