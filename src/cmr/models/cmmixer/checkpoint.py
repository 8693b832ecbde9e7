"""Save and load a CMMixer MAE or retriever: ``spec.json`` + ``model.safetensors`` in one folder.

The spec is the module's own ``spec()`` (kind, arch name, options) plus whatever settings the
caller adds under ``settings``; loading rebuilds the module from the spec and loads every
tensor strictly. Nothing is unpickled.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from safetensors.torch import load_file, save_file
from torch import nn

from cmr.errors import ConfigError
from cmr.io import atomic_path, read_json, write_json
from cmr.models.checkpoint import SPEC_FILE, WEIGHTS_FILE
from cmr.models.cmmixer.archs import CMMixerArch
from cmr.models.cmmixer.mae import CMMixerMAE
from cmr.models.cmmixer.retriever import RETRIEVERS

# the spec carries the whole architecture (``arch_config``), so a checkpoint loads even when its
# JSON config has changed or it was built from an unregistered CMMixerArch
BUILDERS: dict[str, Callable[[dict], nn.Module]] = {
    "mae": lambda spec: CMMixerMAE(CMMixerArch(**spec["arch_config"]), norm_pix_loss=spec["norm_pix_loss"]),
    "retriever": lambda spec: RETRIEVERS.get(spec["retriever"])(
        CMMixerArch(**spec["arch_config"]), embed_dim=spec["embed_dim"], kinds=tuple(spec["kinds"]),
        pool=spec["pool"]),
}


def save_cmmixer(model: nn.Module, out_dir: str | Path, settings: dict | None = None) -> None:
    """Write ``out_dir/spec.json`` (``model.spec()`` + ``settings``) and ``out_dir/model.safetensors`` atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    spec = {**model.spec(), "settings": dict(settings or {})}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"arch": spec["arch"], "kind": spec["kind"]})
        write_json(tmp / SPEC_FILE, spec)


def load_cmmixer(out_dir: str | Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """(module, spec) from a folder written by :func:`save_cmmixer`."""
    out_dir = Path(out_dir)
    spec_path, weights_path = out_dir / SPEC_FILE, out_dir / WEIGHTS_FILE
    spec = read_json(spec_path, dict)
    if not weights_path.is_file():
        raise ConfigError(f"{weights_path}: file not found (not a folder written by save_cmmixer)")
    if spec.get("kind") not in BUILDERS:
        raise ConfigError(f"{spec_path}: kind {spec.get('kind')!r} is not one of {sorted(BUILDERS)}")
    try:
        model = BUILDERS[spec["kind"]](spec)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{spec_path}: missing or unexpected field: {e}") from None
    state = load_file(str(weights_path), device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{weights_path}: does not fit {spec['kind']} arch {spec['arch']!r}: missing "
                          f"{list(missing)[:3]}, unexpected {list(unexpected)[:3]}")
    return model.to(device), spec

