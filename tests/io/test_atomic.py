"""Folders written all or nothing: a failure leaves the folder as it was, and a folder that
cannot be written is refused (SaveError saying so) before any work."""

import os
from pathlib import Path

import pytest
import torch

import moefy
from moefy.errors import SaveError
from moefy.io.atomic import check_writable, replace_files


def _layer():
    return moefy.MoE(8, 16, num_experts=4, top_k=2)


def test_a_file_where_a_folder_is_needed(tmp_path):
    (tmp_path / "file").write_text("keep")
    with pytest.raises(SaveError, match="cannot write .*file/ckpt: .*file is not a directory"):
        moefy.save(_layer(), tmp_path / "file" / "ckpt")
    assert (tmp_path / "file").read_text() == "keep"


def test_a_read_only_folder(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    folder.chmod(0o555)
    try:
        try:  # root writes whatever the permissions say
            (folder / "probe").touch()
        except PermissionError:
            pass
        else:
            pytest.skip("running as root: chmod does not stop writes")
        for target in (folder, folder / "new"):
            with pytest.raises(SaveError, match="save: cannot write .*read-only is not "
                                                "writable"):
                moefy.save(_layer(), target)
        assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    finally:
        folder.chmod(0o755)


def test_a_file_system_that_refuses_writes():
    """Permissions can say yes where the file system says no (sysfs takes no new entry, even
    from root)."""
    sys = Path("/sys")
    if not sys.is_dir():
        pytest.skip("no /sys here")
    target = sys / "moefy-test"
    try:
        target.mkdir()
    except OSError:
        pass
    else:
        target.rmdir()
        pytest.skip("/sys takes new entries here")
    with pytest.raises(SaveError, match="save: cannot write /sys/moefy-test: /sys is not "
                                        "writable"):
        moefy.save(_layer(), target)


def test_check_writable_leaves_nothing_behind(tmp_path):
    check_writable(tmp_path / "new" / "folder", SaveError, "save")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_the_folder_as_it_was(tmp_path):
    (tmp_path / "weights").write_text("old")
    (tmp_path / "plan").write_text("old")

    def write(work: Path) -> None:
        (work / "weights").write_text("new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_files(tmp_path, write, last="plan", stale=["weights"], error=SaveError,
                      what="test")
    assert sorted((p.name, p.read_text()) for p in tmp_path.iterdir()) == [
        ("plan", "old"), ("weights", "old")]


def test_files_move_in_with_the_last_one_last_and_stale_ones_go(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("old")  # an earlier write's, not written again
    moved = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moved.append(Path(b).name), replace(a, b)))

    def write(work: Path) -> None:
        for name in ("z", "plan", "a"):
            (work / name).write_text(name)

    assert replace_files(tmp_path, write, last="plan", stale=["tokenizer.json"],
                         error=SaveError, what="test") == ["a", "plan", "z"]
    assert moved == ["a", "z", "plan"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "plan", "z"]


def test_save_still_round_trips(tmp_path):
    layer = _layer()
    moefy.save(layer, tmp_path / "new" / "folder")
    back = moefy.load(tmp_path / "new" / "folder", _layer())
    assert torch.equal(back.w_in, layer.w_in)
