"""Locks that make registration safe to run concurrently: one for creating the store, one per model.

Creating an MLflow SQL store runs its schema migrations; two processes doing that at
once on a fresh SQLite file collide (``duplicate column name``), so the first open of a
SQLite store is serialised with a file lock beside it. A database server is usually
migrated once by its admin (``mlflow db upgrade``); there a collision is retried.

Registration reads the champion, decides and moves the alias. Those steps must not
interleave between two runs, or both see "no champion yet" (or the same old champion)
and the last one to move the alias wins whatever its score. :func:`registry_lock`
serialises them per registered model through MLflow itself: taking the lock creates a
registered model named ``<model>.lock``, which the store (SQLite, PostgreSQL, MySQL, or a
tracking server in front of one) creates at most once, as it enforces unique names;
releasing deletes it. So the lock works wherever the registry does, with no extra table
or service.
"""
from __future__ import annotations

import os
import random
import socket
import time
import uuid
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cmr.errors import CmrError

OWNER_TAG = "cmr_lock_owner"


def lock_name(model_name: str) -> str:
    """The registered model that stands for the lock on ``model_name``."""
    return f"{model_name}.lock"


def _code(e: MlflowException) -> str:
    return getattr(e, "error_code", "") or ""


def _holder(client: MlflowClient, name: str) -> str | None:
    try:
        return client.get_registered_model(name).tags.get(OWNER_TAG, "?")
    except MlflowException as e:
        if _code(e) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _dead_here(owner: str) -> bool:
    """True when ``owner`` (host:pid:token) is a process of this host that no longer runs."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _release(client: MlflowClient, name: str) -> None:
    try:
        client.delete_registered_model(name)
    except MlflowException as e:
        if _code(e) != "RESOURCE_DOES_NOT_EXIST":
            raise


@contextmanager
def registry_lock(client: MlflowClient, model_name: str, *, wait_s: float = 1800.0, poll_s: float = 0.25,
                  log: Callable[[str], None] = lambda msg: None) -> Iterator[str]:
    """Hold the registration lock of ``model_name`` for the ``with`` body; yields the owner id.

    Waits up to ``wait_s`` seconds for another holder (a re-scored champion can take a
    minute or two), then raises :class:`CmrError` naming the holder. A lock left by a
    process of this host that has died is taken over; one left by a dead process
    elsewhere must be removed by hand (``MlflowClient().delete_registered_model(name)``),
    as nothing here can tell a dead remote process from a slow one.
    """
    name = lock_name(model_name)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        try:
            client.create_registered_model(name, tags={OWNER_TAG: owner},
                                           description=f"lock: {owner} is registering a version of {model_name} "
                                                       f"(since {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC)")
            break
        except MlflowException as e:
            if _code(e) != "RESOURCE_ALREADY_EXISTS":
                raise
        holder = _holder(client, name)
        if holder == owner:  # ours: a tracking server's client retried a create whose reply was lost
            break
        if holder is not None and _dead_here(holder) and _holder(client, name) == holder:
            log(f"registry lock {name!r}: its holder {holder} is gone; taking it over")
            _release(client, name)
            continue
        if time.monotonic() > deadline:
            raise CmrError(f"registry lock {name!r} is held by {holder} for more than {wait_s:.0f} s; if that "
                           f"process is gone, delete the registered model {name!r} and register again")
        if not announced:
            log(f"registry lock {name!r} is held by {holder}: waiting")
            announced = True
        time.sleep(poll_s * (0.5 + random.random()))
    try:
        yield owner
    finally:
        _release(client, name)


def store_init_lock(uri: str):
    """A file lock beside a SQLite store (its first open runs schema migrations); no-op otherwise."""
    if not uri.startswith("sqlite:///"):
        return nullcontext()
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db) + ".init.lock", timeout=600)
