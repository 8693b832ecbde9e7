"""Progress bars for the long loops (feature caching, training epochs, encoding, data checks,
index builds, study cells).

A bar shows the count done, the rate and the time left on stderr when stderr is a
terminal, and nothing otherwise (DVC logs, CI, pipes stay clean). ``TQDM_DISABLE=1``
turns bars off everywhere.
"""
from __future__ import annotations

import sys
from typing import Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")


def _bar(file: TextIO | None, **options):
    """A tqdm bar on ``file`` (default stderr), or None when that is not a terminal."""
    stream = file if file is not None else sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        return None
    from tqdm import tqdm

    # leave=False: the bar of a finished loop gives way to the stage's own one-line summary
    return tqdm(file=stream, leave=False, dynamic_ncols=True, mininterval=0.5, **options)


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it",
             file: TextIO | None = None) -> Iterable[T]:
    """``iterable``, wrapped in a bar that is shown only when ``file`` (default stderr) is a terminal."""
    bar = _bar(file, iterable=iterable, total=total, desc=desc, unit=unit)
    return iterable if bar is None else bar


def progress_chunks(count: int, size: int, desc: str = "", unit: str = "row",
                    file: TextIO | None = None) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges over ``count`` rows, ``size`` rows at a time; the bar (a terminal
    only) counts rows, not chunks, so its rate and time left are in rows."""
    bounds = [(start, min(start + size, count)) for start in range(0, count, max(1, size))]
    bar = _bar(file, total=count, desc=desc, unit=unit)
    if bar is None:
        yield from bounds
        return
    with bar:
        for start, stop in bounds:
            yield start, stop
            bar.update(stop - start)
