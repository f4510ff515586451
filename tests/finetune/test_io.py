"""Atomic writes publish whole files and folders, with the modes the user's umask gives."""

from __future__ import annotations

import os
import stat

from finetune.io import atomic_dir, atomic_file, write_text_atomic


def test_published_files_and_folders_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.toml", "x = 1\n")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "inside.txt").write_text("y")
        os.umask(0o077)
        with atomic_file(tmp_path / "private.bin") as tmp:
            tmp.write_bytes(b"z")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.toml").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "private.bin").stat().st_mode) == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "old")
    try:
        with atomic_file(tmp_path / "a.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk went away")
    except RuntimeError:
        pass
    assert (tmp_path / "a.txt").read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]
