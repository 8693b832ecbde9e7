"""Runnable studies: each module registers ``run(...)`` under a name in ``STUDIES``.

``cmr study NAME`` runs one; every study writes a table (CSV + Markdown) and a plot
under ``studies/<name>/`` and logs one MLflow parent run with a nested run per cell.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

from cmr.registry import Registry

STUDIES = Registry("study")


def names() -> list[str]:
    """The registered study names, read from the modules' ``@STUDIES.register("name")`` lines
    without importing them (importing every study loads torch and open_clip: seconds)."""
    found = []
    for mod in pkgutil.iter_modules(__path__):
        if mod.name.startswith("_"):
            continue
        tree = ast.parse((Path(__file__).parent / f"{mod.name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            for dec in getattr(node, "decorator_list", ()):
                if (isinstance(dec, ast.Call) and ast.unparse(dec.func) == "STUDIES.register" and dec.args
                        and isinstance(dec.args[0], ast.Constant)):
                    found.append(dec.args[0].value)
    return sorted(found)


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
