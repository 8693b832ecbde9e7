"""Two-tower retrieval models: pretrained open_clip backbones + projection heads.

Submodules load on first use of one of their names (:mod:`cmr.lazy`): listing the
registered architectures imports no torch or open_clip.
"""
from cmr.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "architectures": ("ARCHITECTURES", "list_architectures", "resolve_arch"),
    "backbones": ("build_two_tower", "image_transform"),
    "checkpoint": ("load_two_tower", "save_two_tower"),
    "heads": ("HEADS",),
    "two_tower": ("TowerBundle", "TowerSpec", "TwoTower"),
})
