"""Named two-tower architectures, listed without importing open_clip, timm or torch.

- ``lite0-minilm`` (also ``lite1-`` / ``lite2-minilm``): EfficientNet-Lite0/1/2 (timm, ImageNet) +
  all-MiniLM-L6-v2 (HF, mean pooling); architectures in ``configs/lite*-minilm.json``, weights
  from installed packages, no network.
- ``lite0+lite2-minilm`` (and the other :data:`LITE_COMBINATIONS`): those image towers side by
  side, their pooled features concatenated (:class:`cmr.models.concat_visual.ConcatVisual`).
- ``openclip:<name>`` for every open_clip model config (``ViT-B-32``, ``RN50`` ...); the bare
  name works too. ``pretrained`` is an open_clip tag (needs network), a checkpoint file, or
  ``none`` (random init).

Each entry names its builder in :mod:`cmr.models.backbones`, which is imported only when a
model is built: importing open_clip takes seconds, and ``cmr list archs`` or ``cmr check``
only need the names. :func:`cmr.models.backbones.build_two_tower` builds any of them.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cmr.errors import ConfigError
from cmr.models.offline_weights import EFFICIENTNET_LITE
from cmr.registry import Registry, nearest

if TYPE_CHECKING:
    from cmr.models.backbones import Backbones

CONFIG_DIR = Path(__file__).parent / "configs"
OPENCLIP_PREFIX = "openclip:"
NO_WEIGHTS = "none"  # random initialisation; what load_two_tower builds before loading a checkpoint


@dataclass(frozen=True)
class ArchEntry:
    """A registered architecture: ``entry(pretrained) -> Backbones`` calls
    ``cmr.models.backbones.<builder>(*args, pretrained)``, importing that module on the first call."""

    builder: str
    args: tuple = ()

    def __call__(self, pretrained: str) -> Backbones:
        return getattr(importlib.import_module("cmr.models.backbones"), self.builder)(*self.args, pretrained)


ARCHITECTURES: Registry[ArchEntry] = Registry("architecture")

for _lite in EFFICIENTNET_LITE:  # lite0-minilm, lite1-minilm, lite2-minilm (configs/*.json)
    ARCHITECTURES.register(f"{_lite}-minilm")(ArchEntry("lite_minilm", (_lite,)))

# Feature ensembles of the offline image towers (ConcatVisual): lite0+lite2-minilm ...
LITE_COMBINATIONS = (("lite0", "lite2"), ("lite1", "lite2"), ("lite0", "lite1", "lite2"))
for _combo in LITE_COMBINATIONS:
    ARCHITECTURES.register("+".join(_combo) + "-minilm")(ArchEntry("lite_concat_minilm", (_combo,)))


def lite_variants(arch: str) -> tuple[str, ...]:
    """The EfficientNet-Lite variants of an offline ``lite*-minilm`` arch (``('lite0', 'lite2')`` for
    ``lite0+lite2-minilm``); empty for any other arch."""
    if not arch.endswith("-minilm"):
        return ()
    parts = tuple(arch[: -len("-minilm")].split("+"))
    return parts if all(v in EFFICIENTNET_LITE for v in parts) else ()


def openclip_config_names() -> list[str]:
    """What ``open_clip.list_models()`` lists before cmr adds its own configs, read from the JSON
    files in open_clip's ``model_configs/`` folder without importing open_clip.

    open_clip keeps a file as a model config when it has ``embed_dim``, ``vision_cfg`` and
    ``text_cfg``; the same rule is applied here (a test compares the two lists).
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return []
    names = []
    for path in (Path(next(iter(spec.submodule_search_locations))) / "model_configs").glob("*.json"):
        cfg = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(cfg, dict) and {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
            names.append(path.stem)
    return sorted(names)


def _register_openclip() -> None:
    own = {p.stem for p in CONFIG_DIR.glob("*.json")}
    for name in openclip_config_names():
        if name not in own:
            ARCHITECTURES.register(OPENCLIP_PREFIX + name)(ArchEntry("openclip_backbones", (name,)))


_register_openclip()


def list_architectures() -> list[str]:
    return ARCHITECTURES.names()


def resolve_arch(arch: str) -> str:
    """The registered name for ``arch`` (a bare open_clip name gets its prefix)."""
    if arch in ARCHITECTURES:
        return arch
    if OPENCLIP_PREFIX + arch in ARCHITECTURES:
        return OPENCLIP_PREFIX + arch
    names = ARCHITECTURES.names()
    bare = [n[len(OPENCLIP_PREFIX):] for n in names if n.startswith(OPENCLIP_PREFIX)]
    raise ConfigError(f"model.arch: unknown architecture {arch!r}{nearest(arch, names + bare)}; "
                      f"{len(names)} are registered (cmr.models.list_architectures())")
