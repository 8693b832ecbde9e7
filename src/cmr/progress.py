"""Progress bars for the long loops (feature caching, training epochs, encoding, data checks, study cells).

A bar shows the count done, the rate and the time left on stderr when stderr is a
terminal, and nothing otherwise (DVC logs, CI, pipes stay clean). ``TQDM_DISABLE=1``
turns bars off everywhere.
"""
from __future__ import annotations

import sys
from typing import Iterable, TextIO, TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it",
             file: TextIO | None = None) -> Iterable[T]:
    """``iterable``, wrapped in a bar that is shown only when ``file`` (default stderr) is a terminal."""
    from tqdm import tqdm

    stream = file if file is not None else sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        return iterable
    # leave=False: the bar of a finished loop gives way to the stage's own one-line summary
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, leave=False, dynamic_ncols=True,
                mininterval=0.5)
