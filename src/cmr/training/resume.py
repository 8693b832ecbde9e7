"""Per-epoch training checkpoints, so a killed run continues where it stopped.

After every epoch the training loop hands :meth:`Resume.save` everything the next
epoch depends on: the model and loss parameters, the optimiser and scheduler, every
random number generator, and the selection bookkeeping (history, best-so-far and its
state). A rerun with the same ``fingerprint`` (the settings and data version that
decide the result) loads it and runs only the remaining epochs, ending at the same
model, bit for bit, as an uninterrupted run on the same machine. A checkpoint with
another fingerprint is stale: it is deleted and training starts at epoch 1, saying so.

The checkpoint is one file written to a temporary name and renamed, so a kill while
saving leaves the previous epoch's checkpoint, never half a file.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cmr.io import atomic_path, write_json

CHECKPOINT = "state.pt"


def fingerprint(settings: dict) -> str:
    """SHA-256 (hex, 24 chars) of the JSON of ``settings``: equal settings, equal fingerprint."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:24]


def rng_states(gen: torch.Generator) -> dict:
    """Every generator training draws from, as tensors and plain values (loadable with
    ``weights_only=True``): torch's global CPU (and CUDA) generators, ``gen``, numpy's and Python's."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "generator": gen.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate()}


def set_rng_states(states: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    gen.set_state(states["generator"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


@dataclass(frozen=True)
class Resume:
    """Where one training run keeps its checkpoint, and the fingerprint it must match."""

    folder: Path
    fingerprint: str

    @property
    def path(self) -> Path:
        return Path(self.folder) / CHECKPOINT

    def save(self, state: dict) -> None:
        """Write ``state`` (tensors, dicts, lists, numbers; ``state["epoch"]`` the epoch just
        finished) atomically, tagged with the fingerprint."""
        with atomic_path(self.path) as tmp:
            torch.save({"fingerprint": self.fingerprint, **state}, tmp)
        # for people: which run the checkpoint belongs to, without loading it
        write_json(Path(self.folder) / "checkpoint.json",
                   {"fingerprint": self.fingerprint, "epoch": state.get("epoch")})

    def load(self, log: Callable[[str], None]) -> dict | None:
        """The saved state when it matches the fingerprint; else None (a stale or unreadable
        checkpoint is removed and ``log`` says why training starts afresh)."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint means "start afresh"
            log(f"checkpoint {self.path} is unreadable ({type(e).__name__}): starting at epoch 1")
            self.clear()
            return None
        if state.get("fingerprint") != self.fingerprint:
            log(f"checkpoint {self.path} was written with other settings or data: starting at epoch 1")
            self.clear()
            return None
        return state

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
