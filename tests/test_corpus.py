"""examples/corpus.py: the demo's sentence cache lives in a private per-user folder and never
follows a symlink planted where it writes or reads."""

import importlib.util
import os
import stat
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "corpus.py"
SENTENCES = ("One sentence for the corpus.", "Another sentence for the corpus.")


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("moefy_example_corpus", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # examples/ is not a package
    monkeypatch.setattr(module, "_collect", lambda which: SENTENCES)  # not 45 s of parsing
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return module


def test_cache_is_private_per_user_and_not_in_the_shared_temp_folder(corpus, tmp_path):
    assert corpus._corpus("stdlib") == SENTENCES
    folder = tmp_path / "cache" / "moefy"
    assert [f.name for f in folder.iterdir()] == [f"corpus-v2-stdlib-{sys.version_info[1]}.txt"]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    corpus._corpus.cache_clear()
    assert corpus._corpus("stdlib") == SENTENCES  # read back from the cache


def test_a_symlink_planted_at_the_cache_file_is_neither_followed_nor_read(corpus, tmp_path):
    folder = tmp_path / "cache" / "moefy"
    folder.mkdir(parents=True, mode=0o700)
    victim = tmp_path / "victim.txt"
    victim.write_text("poisoned sentence that must not be read.")
    link = corpus.cache_dir() / f"corpus-v2-stdlib-{sys.version_info[1]}.txt"
    link.symlink_to(victim)
    assert corpus._corpus("stdlib") == SENTENCES  # not the victim's content
    assert victim.read_text() == "poisoned sentence that must not be read."  # not written
    assert not link.is_symlink()  # replaced by a regular file of our own


def test_a_symlinked_or_shared_cache_folder_is_refused(corpus, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "moefy").symlink_to(elsewhere, target_is_directory=True)
    assert corpus.cache_dir() is None
    assert corpus._corpus("stdlib") == SENTENCES and not list(elsewhere.iterdir())
    (tmp_path / "cache" / "moefy").unlink()
    (tmp_path / "cache" / "moefy").mkdir(mode=0o777)
    os.chmod(tmp_path / "cache" / "moefy", 0o777)  # others may write: not a safe cache
    assert corpus.cache_dir() is None
