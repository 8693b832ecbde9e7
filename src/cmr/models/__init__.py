"""Two-tower retrieval models: pretrained open_clip backbones + projection heads."""
from cmr.models.architectures import (ARCHITECTURES, build_two_tower, image_transform, list_architectures,
                                      resolve_arch)
from cmr.models.checkpoint import load_two_tower, save_two_tower
from cmr.models.heads import HEADS
from cmr.models.two_tower import TowerBundle, TowerSpec, TwoTower

__all__ = ["ARCHITECTURES", "HEADS", "TowerBundle", "TowerSpec", "TwoTower", "build_two_tower", "image_transform",
           "list_architectures", "load_two_tower", "resolve_arch", "save_two_tower"]
