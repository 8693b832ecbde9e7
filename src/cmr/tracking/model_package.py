"""What the registry stores for a trained two-tower model, and how it is loaded back.

With the towers locked and taken from the installed offline packages (EfficientNet-Lite0,
all-MiniLM-L6-v2; ``spec.pretrained == "offline"``) a registered version differs from the
next only in its heads: storing the towers again would cost ~100 MB per version. Such a
version stores ``spec.json``, ``heads.safetensors`` (every tensor but the towers') and
``towers.json`` (a SHA-256 digest of the tower tensors); loading rebuilds the towers from
the installed packages and refuses them if their digest differs, so a package upgrade can
never silently change a registered model. Towers that were trained, or that come from a
checkpoint file, are stored whole (the folder of :func:`cmr.models.save_two_tower`).
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cmr.errors import ConfigError
from cmr.io import atomic_path, read_json, write_json
from cmr.models import build_two_tower, load_two_tower
from cmr.models.two_tower import TowerBundle, TowerSpec

SPEC_FILE, HEADS_FILE, TOWERS_FILE = "spec.json", "heads.safetensors", "towers.json"
#: parameters of the open_clip model that belong to neither tower (trained with the heads)
_SHARED = ("clip.logit_scale", "clip.logit_bias")


def is_tower_key(key: str) -> bool:
    """State-dict keys of the image and text towers (``clip.*`` but the logit scale/bias)."""
    return key.startswith("clip.") and key not in _SHARED


def tower_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tower tensors of ``state``: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for key in sorted(k for k in state if is_tower_key(k)):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _offline_towers(spec: TowerSpec) -> TowerBundle:
    return build_two_tower(spec.arch, "offline", spec.embed_dim, spec.head, device="cpu")


def package_model(model_dir: str | Path, out_dir: str | Path) -> dict:
    """Write the registry's copy of the model saved in ``model_dir`` to ``out_dir``.

    Returns ``{"towers": "referenced" | "copied", "digest": ..., "bytes": size of out_dir}``.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    spec = TowerSpec.from_dict(read_json(model_dir / SPEC_FILE), where=str(model_dir / SPEC_FILE))
    state = load_file(str(model_dir / "model.safetensors"), device="cpu")
    digest = tower_digest(state)
    same = spec.pretrained == "offline" and tower_digest(_offline_towers(spec).model.state_dict()) == digest
    with atomic_path(out_dir) as tmp:
        if same:
            tmp.mkdir()
            shutil.copy(model_dir / SPEC_FILE, tmp / SPEC_FILE)
            save_file({k: v.contiguous() for k, v in state.items() if not is_tower_key(k)}, str(tmp / HEADS_FILE))
            write_json(tmp / TOWERS_FILE, {"source": "offline", "arch": spec.arch, "sha256": digest})
        else:
            shutil.copytree(model_dir, tmp)
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    return {"towers": "referenced" if same else "copied", "digest": digest, "bytes": size}


def load_packaged(folder: str | Path, device: str = "cpu") -> TowerBundle:
    """Rebuild a model written by :func:`package_model` (or a plain ``save_two_tower`` folder)."""
    folder = Path(folder)
    if not (folder / TOWERS_FILE).is_file():
        return load_two_tower(folder, device=device)
    spec = TowerSpec.from_dict(read_json(folder / SPEC_FILE), where=str(folder / SPEC_FILE))
    recorded = read_json(folder / TOWERS_FILE)["sha256"]
    bundle = _offline_towers(spec)
    model = bundle.model
    if tower_digest(model.state_dict()) != recorded:
        raise ConfigError(f"{folder / TOWERS_FILE}: the installed offline towers of {spec.arch!r} differ from "
                          "the ones this model was trained on (sha256 mismatch); install the package versions "
                          "of its requirements")
    heads = load_file(str(folder / HEADS_FILE), device="cpu")
    expected = {k for k in model.state_dict() if not is_tower_key(k)}
    if set(heads) != expected:
        raise ConfigError(f"{folder / HEADS_FILE}: does not fit arch {spec.arch!r}: missing "
                          f"{sorted(expected - set(heads))[:3]}, unexpected {sorted(set(heads) - expected)[:3]}")
    model.load_state_dict(heads, strict=False)
    return bundle._replace(model=model.to(device), spec=spec)
