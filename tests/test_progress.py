"""Progress bars: counts and time left on a terminal, nothing when stderr is a file or a pipe."""
import io

import torch

from cmr.progress import progress, progress_chunks
from cmr.training.features import encode_batched


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_with_counts_on_a_terminal_and_nothing_elsewhere():
    tty, pipe = _Terminal(), io.StringIO()
    assert list(progress(range(4), 4, "cells", file=tty)) == [0, 1, 2, 3]
    assert list(progress(range(4), 4, "cells", file=pipe)) == [0, 1, 2, 3]
    assert "cells" in tty.getvalue() and "0/4" in tty.getvalue()  # the first draw; later ones are throttled
    assert pipe.getvalue() == ""


def test_feature_encoding_shows_batches_done_and_left(monkeypatch):
    tty = _Terminal()
    monkeypatch.setattr("sys.stderr", tty)
    out = encode_batched(lambda b: b * 2, [torch.ones(2, 3)] * 3, total=3, desc="images (6)")
    assert out.shape == (6, 3) and torch.equal(out, torch.full((6, 3), 2.0))
    shown = tty.getvalue()
    assert "images (6)" in shown and "0/3" in shown and "<" in shown  # elapsed<left


def test_chunks_cover_every_row_once_and_the_bar_counts_rows():
    tty, pipe = _Terminal(), io.StringIO()
    assert list(progress_chunks(10, 4, "adding", file=pipe)) == [(0, 4), (4, 8), (8, 10)]
    assert list(progress_chunks(10, 4, "adding", file=tty)) == [(0, 4), (4, 8), (8, 10)]
    assert list(progress_chunks(0, 4, file=pipe)) == []
    assert "adding" in tty.getvalue() and "0/10" in tty.getvalue() and pipe.getvalue() == ""


def test_an_index_build_shows_vectors_added_and_time_left(monkeypatch):
    from cmr.retrieval import index

    tty = _Terminal()
    monkeypatch.setattr("sys.stderr", tty)
    monkeypatch.setattr(index, "ADD_CHUNK", 100)
    x = torch.nn.functional.normalize(torch.randn(450, 8), dim=1).numpy()
    built = index.build_index("ivf", x, [str(i) for i in range(450)], device="cpu", nlist=4, recall_sample=0,
                                label="images")
    assert built.count == 450
    shown = tty.getvalue()
    assert "images: adding to the ivf index" in shown and "0/450" in shown and "<" in shown
