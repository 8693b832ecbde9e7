"""Reading the pipeline's own artefacts: a missing, corrupt or incomplete file is a DataError naming it."""
import os

import numpy as np
import pytest

from cmr.embeddings import load_split
from cmr.errors import DataError
from cmr.io import read_json, read_npz


def test_read_json_names_the_file_and_the_rule(tmp_path):
    path = tmp_path / "x.json"
    with pytest.raises(DataError, match=rf"{path}: breaks rule 'file exists'"):
        read_json(path)
    path.write_text('{"a": 1,\n "b": }')
    with pytest.raises(DataError, match=rf"{path}:2: breaks rule 'valid JSON'"):
        read_json(path)
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(DataError, match=rf"{path}: breaks rule 'UTF-8 JSON'"):
        read_json(path)
    path.write_text("[1, 2]")
    assert read_json(path) == [1, 2]
    with pytest.raises(DataError, match=rf"{path}: breaks rule 'a JSON object': got list"):
        read_json(path, dict)
    with pytest.raises(DataError, match=rf"{tmp_path}: breaks rule 'a JSON file': is a folder"):
        read_json(tmp_path)


def test_read_npz_names_the_file_and_the_rule(tmp_path):
    path = tmp_path / "x.npz"
    with pytest.raises(DataError, match=rf"{path}: breaks rule 'file exists'"):
        read_npz(path, ("a",))
    np.savez(path, a=np.arange(3), b=np.ones(2))
    assert sorted(read_npz(path)) == ["a", "b"] and read_npz(path, ("a",))["a"].tolist() == [0, 1, 2]
    with pytest.raises(DataError, match=rf"{path}: breaks rule 'holds arrays a, c': missing c"):
        read_npz(path, ("a", "c"))
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(DataError, match=rf"{path}: breaks rule 'a readable .npz of plain arrays'"):
        read_npz(path, ("a",))
    path.write_text("not an archive")
    with pytest.raises(DataError, match=rf"{path}: breaks rule 'a readable .npz of plain arrays'"):
        read_npz(path)
    np.savez(path, a=np.array([{"pickled": 1}], dtype=object))
    with pytest.raises(DataError, match=rf"{path}: breaks rule 'a readable .npz of plain arrays'.*pickle"):
        read_npz(path, ("a",))


def test_embeddings_that_break_their_layout_are_rejected(tmp_path):
    path = tmp_path / "test.npz"
    fields = dict(image=np.zeros((2, 4), np.float32), text=np.zeros((3, 4), np.float32), text_item=np.array([0, 1, 2]),
                  ids=np.array(["a", "b"]), texts=np.array(["x", "y", "z"]), labels=np.zeros((2, 0), np.float32),
                  identity=np.full(2, -1))
    np.savez(path, **fields)
    with pytest.raises(DataError, match=rf"{path}: text_item: breaks rule 'image rows in \[0, 2\)': got 0..2"):
        load_split(path)
    np.savez(path, **(fields | {"text_item": np.array([0, 1, 1])}))
    assert load_split(path).text_item.tolist() == [0, 1, 1]
    text = fields["text"].copy()
    text[2, 1] = np.nan
    np.savez(path, **(fields | {"text_item": np.array([0, 1, 1]), "text": text}))
    with pytest.raises(DataError, match=rf"{path}: text\[2\]: breaks rule 'all embedding values finite'"):
        load_split(path)
    np.savez(path, **{k: v for k, v in fields.items() if k != "texts"})
    with pytest.raises(DataError, match="missing texts"):
        load_split(path)


def test_leftovers_of_a_write_killed_during_the_folder_swap_are_recovered(tmp_path):
    from cmr.io import atomic_path

    target = tmp_path / "pretrain"
    # killed between the two renames: the old version sits in .pretrain.old, no target, an empty tmp
    (tmp_path / ".pretrain.old").mkdir()
    (tmp_path / ".pretrain.old" / "model.bin").write_text("old")
    (tmp_path / ".pretrain.abc123.tmp").mkdir()  # a folder of the naming before pids
    (tmp_path / ".pretrain.pid999999999.xyz.tmp").mkdir()  # its writer is gone
    alive = tmp_path / f".pretrain.pid{os.getpid()}.live.tmp"  # a writer that still runs
    alive.mkdir()
    from cmr.io import recover

    recover(target)
    assert (target / "model.bin").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["pretrain", alive.name])
    # and the next write replaces it, leaving nothing but the live writer's folder beside it
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "model.bin").write_text("new")
    assert (target / "model.bin").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["pretrain", alive.name])


def test_an_old_copy_beside_a_complete_target_is_removed(tmp_path):
    from cmr.io import recover

    (tmp_path / "x").write_text("current")
    (tmp_path / ".x.old").write_text("older")
    recover(tmp_path / "x")
    assert (tmp_path / "x").read_text() == "current" and not (tmp_path / ".x.old").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused_before_work(tmp_path):
    from cmr.errors import ConfigError
    from cmr.io import check_writable

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match=r"ro/models/pretrain: cannot write in .*ro \(Permission denied\)"):
            check_writable(ro / "models" / "pretrain")
    finally:
        ro.chmod(0o755)
    check_writable(tmp_path / "new" / "deeper" / "out")  # missing folders are fine: they can be made
    assert not (tmp_path / "new").exists()


def test_a_not_a_folder_parent_is_refused(tmp_path):
    from cmr.errors import ConfigError
    from cmr.io import check_writable

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"cannot write in .*file \(Not a directory\)"):
        check_writable(tmp_path / "file" / "out")


def test_an_os_error_in_a_stage_is_one_line(capsys, monkeypatch, repo_root):
    monkeypatch.chdir(repo_root)
    from cmr.stages._common import stage_main

    def body(_p):
        raise OSError(28, "No space left on device", "data/models/pretrain")

    assert stage_main("pretrain", body, []) == 2
    assert capsys.readouterr().err.strip() == "cmr pretrain: error: No space left on device: data/models/pretrain"
