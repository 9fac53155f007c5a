"""moefy/runtime/kernels.py: the C++ kernel build never hangs, whatever an earlier build left.

Each case runs ``decode_kernels_available()`` in a child process with a hard timeout (so that a
regression fails the test instead of hanging the suite) and a private TORCH_EXTENSIONS_DIR.
"""

import fcntl
import os
import shutil
import subprocess
import sys
import time

import pytest

from moefy.runtime import kernels

CALL = ("from moefy.runtime.kernels import decode_kernels_available as available; "
        "print('available:', available())")


def run_child(ext_dir, timeout_s, **env):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext_dir), **env}
    env.pop("MOEFY_NO_EXT", None)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-W", "always", "-c", CALL], env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    return done.stdout + done.stderr, time.perf_counter() - start


def planted_build_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build_dir = kernels.build_directory()
    build_dir.mkdir(parents=True)
    lock = build_dir / "lock"
    lock.touch()  # what a build killed half way leaves behind: torch waits on it forever
    return build_dir, lock


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="needs a C++ compiler")
def test_stale_lock_from_a_killed_build_is_removed_and_the_build_completes(
        tmp_path, monkeypatch):
    build_dir, lock = planted_build_dir(tmp_path, monkeypatch)
    out, _ = run_child(tmp_path, timeout_s=240)
    assert "available: True" in out, out
    assert "removed stale lock" in out and str(lock) in out
    assert not lock.exists() and any(build_dir.glob("*.built"))


def test_a_lock_held_by_a_live_builder_times_out_with_the_way_out(tmp_path, monkeypatch):
    build_dir, lock = planted_build_dir(tmp_path, monkeypatch)
    with open(build_dir / "builder.flock", "w") as owner:
        fcntl.flock(owner, fcntl.LOCK_EX)  # another process "building" and stuck
        out, seconds = run_child(tmp_path, timeout_s=60, MOEFY_EXT_BUILD_TIMEOUT="2")
    assert "available: False" in out, out
    assert "did not finish within 2 s" in out and f"delete {lock}" in out
    assert seconds < 30
    assert lock.exists()  # a live builder's lock is not ours to remove


def test_a_damaged_library_falls_back_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build_dir, name = kernels.build_directory(), kernels.library_name()
    build_dir.mkdir(parents=True)
    (build_dir / f"{name}.so").write_bytes(b"\x7fELF truncated")
    (build_dir / f"{name}.built").write_text(name)
    out, _ = run_child(tmp_path, timeout_s=60)
    assert "available: False" in out, out
    assert "could not load" in out and f"delete {build_dir}" in out


def test_an_unwritable_extensions_folder_falls_back_instead_of_raising(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # mkdir below it fails, whoever runs the test
    out, _ = run_child(blocker / "ext", timeout_s=60)
    assert "available: False" in out, out
    assert "cannot build the C++ decode kernels" in out
