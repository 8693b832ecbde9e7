"""Package exports imported on first use (PEP 562), so naming a light submodule is cheap.

``import cmr.models.architectures`` runs ``cmr/models/__init__.py`` first; if that imported
every submodule, ``cmr list archs`` would wait seconds for torch, timm and open_clip to load
just to print names. With :func:`lazy_exports` the package's public names stay the same
(``from cmr.models import build_two_tower`` works) but each submodule loads when one of its
names is first asked for.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]]) -> tuple[Callable[[str], Any], list[str]]:
    """``(__getattr__, __all__)`` for ``package`` from ``{submodule: (name, ...)}``."""
    where = {name: f"{package}.{module}" for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(where[name]), name)

    return __getattr__, sorted(where)
