"""What every stage entry point shares: read params, pick the device, turn errors into exit codes.

Stage modules expose a pure-ish ``run(...)`` with explicit arguments (called by
``dvc.yaml`` through ``main()``, by ``flows/`` and by the CLI) and a ``main()`` that
only reads ``params.yaml`` and calls ``run``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from cmr.config import Params, load_params, parse_overrides
from cmr.errors import CmrError

# No network is the normal case for this project: keep telemetry and hub look-ups off
# unless the user turned them on explicitly.
for _k, _v in {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
               "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise CmrError("device 'cuda' was asked for (params.yaml: device) but torch sees no CUDA device")
    return device


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def stage_main(name: str, body: Callable[[Params], object], argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m cmr.stages.{name}")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")
    args = ap.parse_args(argv)
    # under torchrun every rank may fail alike, or one alone: say which
    rank = f" (rank {os.environ.get('RANK')})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    return one_line_errors(f"cmr {name}{rank}", lambda: body(load_params(args.params, parse_overrides(args.set))))


def one_line_errors(prog: str, body: Callable[[], object]) -> int:
    """Run ``body()``: 0 when it returns; when it raises a CmrError or an OSError (a full disk, a
    read-only folder, a missing file), one line ``<prog>: error: ...`` on stderr and 2, no traceback."""
    try:
        body()
    except CmrError as e:
        log(f"{prog}: error: {e}")
        return 2
    except OSError as e:  # the OS's one line says it best
        log(f"{prog}: error: {os_error_line(e)}")
        return 2
    return 0


def os_error_line(e: OSError) -> str:
    """'No space left on device: data/models/x' from an OSError (no traceback)."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
    return f"{e.strerror or type(e).__name__}{': ' + where if where else ''}"

