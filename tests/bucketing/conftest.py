"""Helpers for the bucketing tests: images with EXIF orientations, and a digest of a folder tree."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image


@pytest.fixture
def oriented():
    return write_oriented


@pytest.fixture
def tree_digest():
    return digest_tree


def write_oriented(path: Path, stored_hw: tuple[int, int], orientation: int) -> Path:
    """A JPEG stored as `stored_hw` (h, w) with EXIF orientation tag 0x0112 set; a black block marks its
    stored top-left corner so the applied rotation can be seen."""
    height, width = stored_hw
    image = Image.new("RGB", (width, height), (230, 230, 230))
    image.paste((0, 0, 0), (0, 0, width // 4, height // 4))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, exif=exif, quality=95)
    return path


def digest_tree(folder: Path) -> str:
    """Names, bytes and mtimes of everything under `folder`: any write or touch changes it."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        stat = path.lstat()
        digest.update(f"{path}|{stat.st_mtime_ns}|{stat.st_mode}".encode())
        if path.is_file() and not path.is_symlink():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def count_decodes(monkeypatch):
    """Counts Image.Image.load calls (full pixel decodes) made from now on."""
    calls = []
    original = Image.Image.load

    def counting_load(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "load", counting_load)
    return calls
