"""Atomic folders: complete or absent, and a racing writer never replaces a finished folder."""

from __future__ import annotations

import pytest

from ftflow.utils import atomic_dir, atomic_write_text, sha256_tree


def test_atomic_dir_appears_only_when_complete(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("partial")
            raise RuntimeError("killed")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("done")
    assert (final / "a.txt").read_text() == "done"


def test_racing_writer_does_not_replace_a_finished_folder(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as slow:
        (slow / "a.txt").write_text("second")
        with atomic_dir(final) as fast:  # another process finishes the same key first
            (fast / "a.txt").write_text("first")
        inode = (final / "a.txt").stat().st_ino
    assert (final / "a.txt").read_text() == "first" and (final / "a.txt").stat().st_ino == inode
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_write_text_and_tree_hash(tmp_path):
    atomic_write_text(tmp_path / "d" / "f.txt", "x")
    h1 = sha256_tree(tmp_path / "d")
    atomic_write_text(tmp_path / "d" / "f.txt", "y")
    assert sha256_tree(tmp_path / "d") != h1
