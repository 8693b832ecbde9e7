"""Where a number came from: git commit, data version, DVC lock hashes."""
from __future__ import annotations

import subprocess
from pathlib import Path

import yaml


def git_commit(cwd: str | Path = ".") -> tuple[str, bool]:
    """(commit sha or 'unknown', dirty?)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return sha, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def dvc_dep_hash(lock_path: str | Path, stage: str, dep_path: str) -> str | None:
    """md5 that ``dvc.lock`` records for ``dep_path`` of ``stage`` (the DVC data version), if any."""
    lock_path = Path(lock_path)
    if not lock_path.exists():
        return None
    lock = yaml.safe_load(lock_path.read_text()) or {}
    for dep in (lock.get("stages", {}).get(stage, {}) or {}).get("deps", []):
        if dep.get("path", "").rstrip("/") == dep_path.rstrip("/"):
            return dep.get("md5") or dep.get("hash")
    return None
