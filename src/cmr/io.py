"""Atomic file writes: write to a temporary name beside the target, then rename.

A crash mid-write never leaves half an artifact under the final name.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cmr.errors import DataError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def recover(path: str | os.PathLike) -> None:
    """Undo what a killed :func:`atomic_path` left beside ``path``.

    A kill between its two renames leaves ``.<name>.old`` and no ``path``: the old
    version is put back. A kill at any point leaves a ``.<name>.pid<N>.*.tmp`` folder: it
    is removed once process N is gone (one from before this naming, with no pid, always).
    """
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if old.exists() and not path.exists():
        os.replace(old, path)
    elif old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    elif old.exists():
        old.unlink()
    if not path.parent.is_dir():
        return
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        pid = re.match(r"pid(\d+)\.", tmp.name[len(path.name) + 2:])
        if pid is None or not _alive(int(pid.group(1))):
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` on success.

    Works for files and for folders (the caller creates whichever it needs). Leftovers
    of a killed earlier write are recovered first (:func:`recover`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.pid{os.getpid()}.", suffix=".tmp", dir=path.parent))
    tmp = tmp / (path.name + suffix)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def check_writable(path: str | os.PathLike) -> None:
    """ConfigError unless ``path`` (a file or folder to be written) can be created: its nearest
    existing parent folder must accept a new file. Run it before long work that ends in a write."""
    from cmr.errors import ConfigError

    parent = Path(path).absolute().parent
    while not parent.exists():
        parent = parent.parent
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".cmr-write-check."):
            pass
    except OSError as e:
        raise ConfigError(f"{path}: cannot write in {parent} ({e.strerror or type(e).__name__})") from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike, kind: type | None = None) -> Any:
    """The JSON value in ``path``; a missing, unreadable or malformed file (or, with ``kind``, a
    value of another type) is a DataError naming the file."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(str(path), "file exists", "missing; run the stage that writes it") from None
    except IsADirectoryError:
        raise DataError(str(path), "a JSON file", "is a folder") from None
    except UnicodeDecodeError as e:
        raise DataError(str(path), "UTF-8 JSON", f"{e.reason} at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}", "valid JSON", e.msg) from None
    if kind is not None and not isinstance(value, kind):
        raise DataError(str(path), f"a JSON {'object' if kind is dict else kind.__name__}",
                        f"got {type(value).__name__}")
    return value


def read_npz(path: str | os.PathLike, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Arrays ``keys`` (default: all) of the .npz file ``path``, no pickled objects; a missing,
    corrupt or incomplete file is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "file exists", "missing; run the stage that writes it")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = tuple(z.files) if keys is None else keys
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise DataError(str(path), f"holds arrays {', '.join(keys)}", f"missing {', '.join(missing)}")
            return {k: z[k] for k in keys}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(str(path), "a readable .npz of plain arrays", str(e).splitlines()[0] or type(e).__name__) from None


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
