"""Save and load a trained two-tower model: ``spec.json`` + ``model.safetensors`` in one folder.

Loading rebuilds the architecture from the spec without pretrained weights, then loads
every tensor strictly; nothing is unpickled.
"""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from cmr.errors import ConfigError
from cmr.io import atomic_path, read_json, write_json
from cmr.models.architectures import NO_WEIGHTS
from cmr.models.backbones import build_two_tower
from cmr.models.two_tower import TowerBundle, TowerSpec

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "model.safetensors"


def save_two_tower(model: nn.Module, spec: TowerSpec, out_dir: str | Path) -> None:
    """Write ``out_dir/spec.json`` and ``out_dir/model.safetensors`` atomically (replacing the folder)."""
    # safetensors wants contiguous tensors; channels-last conv weights are not.
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"arch": spec.arch})
        write_json(tmp / SPEC_FILE, spec.to_dict())


def load_two_tower(out_dir: str | Path, device: str = "cpu") -> TowerBundle:
    """Rebuild the model saved by :func:`save_two_tower`; ``bundle.spec`` is the saved spec."""
    out_dir = Path(out_dir)
    spec_path, weights_path = out_dir / SPEC_FILE, out_dir / WEIGHTS_FILE
    for path in (spec_path, weights_path):
        if not path.is_file():
            raise ConfigError(f"{path}: file not found (not a folder written by save_two_tower)")
    spec = TowerSpec.from_dict(read_json(spec_path), where=str(spec_path))
    bundle = build_two_tower(spec.arch, NO_WEIGHTS, spec.embed_dim, spec.head, device=device)
    state = load_file(str(weights_path), device="cpu")
    expected = bundle.model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"{weights_path}: does not fit arch {spec.arch!r}: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    bundle.model.load_state_dict(state, strict=True)
    return bundle._replace(spec=spec)
