"""Name -> object registries.

Losses, backbones, dataset readers, calibrators and index types register under a
name; ``params.yaml`` picks one by that name. An unknown name is an error that
lists the registered names and the nearest one.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from cmr.errors import UnknownNameError

T = TypeVar("T")


def nearest(name: str, choices) -> str:
    """' (did you mean X?)' for the closest of ``choices``, or ''."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


class Registry(Generic[T]):
    """A named collection of factories, e.g. ``LOSSES = Registry("loss")``."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name, e.g. a list from YAML
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{nearest(name, self._entries)}; "
                f"registered: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
