"""Runnable studies: each module registers ``run(...)`` under a name in ``STUDIES``.

``cmr study NAME`` runs one; every study writes a table (CSV + Markdown) and a plot
under ``studies/<name>/`` and logs one MLflow parent run with a nested run per cell.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from cmr.registry import Registry

STUDIES = Registry("study")


def load_all() -> Registry:
    """Import every study module so that its ``@STUDIES.register`` runs."""
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
    return STUDIES


def output_dir(name: str, quick: bool) -> Path:
    """``studies/<name>/`` (``studies/<name>-quick/`` for a smoke run, so it never overwrites a full study)."""
    out = Path("studies") / (f"{name}-quick" if quick else name)
    out.mkdir(parents=True, exist_ok=True)
    return out
