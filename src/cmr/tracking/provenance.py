"""Where a number came from: git commit, data version, DVC lock hashes."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml


def git_commit(cwd: str | Path = ".") -> tuple[str, bool]:
    """(commit sha, dirty?); dirty counts untracked files that git does not ignore (a new module
    changes the code as much as an edit). Outside a git checkout: ('unknown', True), since
    nothing vouches for the code."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=cwd,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return sha, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True


def dvc_dep_hash(lock_path: str | Path, stage: str, dep_path: str) -> str | None:
    """md5 that ``dvc.lock`` records for ``dep_path`` of ``stage`` (the DVC data version), if any.

    Only under ``dvc repro`` (DVC sets ``DVC_STAGE`` for a stage's command) is the lock
    known to describe the data of this run: the Prefect flows and ``cmr stage`` do not update
    it, so elsewhere there is no DVC hash to report (the run's own ``data_version`` stands).
    """
    lock_path = Path(lock_path)
    if not os.environ.get("DVC_STAGE") or not lock_path.exists():
        return None
    lock = yaml.safe_load(lock_path.read_text()) or {}
    for dep in (lock.get("stages", {}).get(stage, {}) or {}).get("deps", []):
        if dep.get("path", "").rstrip("/") == dep_path.rstrip("/"):
            return dep.get("md5") or dep.get("hash")
    return None
