"""CMMixer architectures as data: one ``configs/cmmixer-*.json`` file per registered name.

Reading them needs no torch, so ``cmr list archs`` and ``cmr check`` stay fast; the ViT the
numbers describe is :class:`cmr.models.cmmixer.vit.ViTEncoder`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from cmr.errors import ConfigError
from cmr.registry import Registry

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class CMMixerArch:
    """One architecture. ``image_size``/``frames`` are the nominal input (S, T) it was sized for;
    the model itself accepts any image whose sides are multiples of ``patch_size``."""

    name: str
    patch_size: int
    dim: int
    depth: int
    heads: int
    mlp_ratio: float
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    image_size: int
    frames: int

    def to_dict(self) -> dict:
        return asdict(self)


CMMIXER_ARCHS: Registry[CMMixerArch] = Registry("cmmixer architecture")


def _read_arch(path: Path) -> CMMixerArch:
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw.pop("model", None)
    names = {f.name for f in fields(CMMixerArch)} - {"name"}
    if set(raw) != names:
        raise ConfigError(f"{path}: keys must be exactly {sorted(names)}; got {sorted(raw)}")
    arch = CMMixerArch(name=path.stem, **raw)
    for width, heads, what in ((arch.dim, arch.heads, "dim/heads"), (arch.decoder_dim, arch.decoder_heads,
                                                                     "decoder_dim/decoder_heads")):
        if width % heads or width % 4:
            raise ConfigError(f"{path}: {what} = {width}/{heads}: width must divide by heads and by 4 (sin-cos)")
    return arch


def _register_configs() -> None:
    for path in sorted(CONFIG_DIR.glob("cmmixer-*.json")):
        CMMIXER_ARCHS.register(path.stem)(_read_arch(path))


_register_configs()


def get_arch(arch: str | CMMixerArch) -> CMMixerArch:
    """The registered architecture called ``arch`` (an instance passes through)."""
    return arch if isinstance(arch, CMMixerArch) else CMMIXER_ARCHS.get(arch)
