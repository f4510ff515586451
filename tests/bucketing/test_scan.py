"""Scanning: sizes from headers, each bad kind reported, masks paired, each file decoded once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

import bucketing.scan as scan
from bucketing.scan import ValidationCache, scan_folder, walk_images
from conftest import make_image


def test_sizes_follow_exif_orientation(tmp_path, oriented):
    for orientation in range(1, 9):
        oriented(tmp_path / f"o{orientation}.jpg", (30, 50), orientation)
    result = scan_folder(tmp_path)
    sizes = {r.rel_path: r.original_size for r in result.records}
    assert sizes == {f"o{o}.jpg": ((50, 30) if o >= 5 else (30, 50)) for o in range(1, 9)}
    notes = dict(result.notes)
    assert "o1.jpg" not in notes and notes["o6.jpg"] == "EXIF orientation 6 applied (seen as 50x30, h x w)"


def test_each_bad_kind_is_skipped_with_its_reason(tmp_path, monkeypatch):
    make_image(tmp_path / "good.png", 40, 60)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "fake.jpg").write_text("not an image")
    whole = make_image(tmp_path / "cut.png", 150, 150).read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    make_image(tmp_path / "big.png", 200, 200)
    make_image(tmp_path / "tiny.png", 20, 30, color=(1, 2, 3))
    (tmp_path / "copy.png").write_bytes((tmp_path / "good.png").read_bytes())
    make_image(tmp_path / "anim.gif", 10, 10)
    (tmp_path / "notes.md").write_text("ignored: not an image extension")
    result = scan_folder(tmp_path, max_pixels=30_000, min_original_side=32)
    assert [r.rel_path for r in result.records] == ["copy.png"]  # sorted walk: the first of two copies is kept
    reasons = dict(result.problems)
    assert set(reasons) == {"anim.gif", "big.png", "cut.png", "empty.png", "fake.jpg", "good.png", "tiny.png"}
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert reasons["fake.jpg"].startswith("not an image")
    assert reasons["cut.png"].startswith("unreadable or truncated image")
    assert reasons["big.png"].startswith("200x200 pixels is over the limit of 30000")
    assert reasons["tiny.png"].startswith("too small: 30x20")
    assert reasons["good.png"] == "exact duplicate of copy.png: skipped, the image is kept once"
    assert reasons["anim.gif"].startswith("unsupported image format")


def test_decompression_bomb_is_refused_not_raised(tmp_path, monkeypatch):
    make_image(tmp_path / "bomb.png", 100, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow's own limit, as for a real bomb
    result = scan_folder(tmp_path, max_pixels=100)
    assert result.records == [] and "bomb.png" in dict(result.problems)
    assert dict(result.problems)["bomb.png"].startswith(("refused as a decompression bomb", "100x100 pixels"))


def test_masks_pair_with_their_image(tmp_path):
    make_image(tmp_path / "cat.jpg", 40, 60)
    make_image(tmp_path / "cat_mask.png", 40, 60, color=(255, 255, 255))
    make_image(tmp_path / "dog.png", 40, 60)
    make_image(tmp_path / "dog_mask.png", 30, 60)  # wrong size: not used
    make_image(tmp_path / "face_mask.png", 50, 50)  # no face.*: an ordinary image
    result = scan_folder(tmp_path)
    records = {r.rel_path: r for r in result.records}
    assert set(records) == {"cat.jpg", "dog.png", "face_mask.png"}
    assert records["cat.jpg"].mask_path == str(tmp_path / "cat_mask.png")
    assert records["dog.png"].mask_path == "" and records["face_mask.png"].mask_path == ""
    assert dict(result.problems)["dog_mask.png"].startswith("mask not used: it is 60x30 (w x h)")


def test_rebuild_of_an_unchanged_folder_decodes_nothing(tmp_path, count_decodes):
    folder = tmp_path / "imgs"
    for i in range(3):
        make_image(folder / f"{i}.png", 40 + i, 50)
    cache = tmp_path / "validation.json"
    count_decodes.clear()
    first = scan_folder(folder, validation_cache=cache)
    assert first.decoded == 3 and len(count_decodes) >= 3
    count_decodes.clear()
    again = scan_folder(folder, validation_cache=cache)
    assert again.decoded == 0 and count_decodes == []  # not even a header: sizes come from the cache
    assert again.records == first.records
    os.utime(folder / "1.png", ns=(1, 1))  # a touched file is validated again, the others are not
    assert scan_folder(folder, validation_cache=cache).decoded == 1


def test_changing_max_pixels_needs_no_stale_refusal(tmp_path, count_decodes):
    make_image(tmp_path / "imgs" / "a.png", 100, 100)
    cache = tmp_path / "v.json"
    count_decodes.clear()
    assert scan_folder(tmp_path / "imgs", max_pixels=5000, validation_cache=cache).records == []
    assert count_decodes == []  # over the limit: never decoded
    raised = scan_folder(tmp_path / "imgs", max_pixels=20_000, validation_cache=cache)
    assert raised.decoded == 1 and len(raised.records) == 1  # the old refusal is not reused
    lowered = scan_folder(tmp_path / "imgs", max_pixels=5000, validation_cache=cache)
    assert lowered.decoded == 0 and "over the limit" in lowered.problems[0][1]


def test_a_damaged_cache_costs_only_a_revalidation(tmp_path):
    make_image(tmp_path / "imgs" / "a.png", 30, 30)
    cache = tmp_path / "v.json"
    cache.write_text("{not json")
    assert scan_folder(tmp_path / "imgs", validation_cache=cache).decoded == 1
    assert json.loads(cache.read_text())["version"] == scan.CACHE_VERSION
    shared = ValidationCache(cache)
    assert scan_folder(tmp_path / "imgs", validation_cache=shared).decoded == 0 and shared.used


def test_many_new_files_are_decoded_in_worker_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(scan, "PARALLEL_MIN_FILES", 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    pools = []

    class RecordingPool(scan.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(scan, "ProcessPoolExecutor", RecordingPool)
    for i in range(4):
        make_image(tmp_path / f"{i}.png", 30, 30 + i)
    (tmp_path / "bad.png").write_text("x")
    result = scan_folder(tmp_path)
    assert result.decoded == 5 and len(result.records) == 4 and dict(result.problems)["bad.png"].startswith("not an")
    assert len(pools) == 1 and pools[0]["max_workers"] == 2


def test_recursion_and_symlink_loops(tmp_path):
    folder = tmp_path / "imgs"
    make_image(folder / "top.png", 32, 32)
    make_image(folder / "sub" / "x.png", 64, 64)
    os.symlink(folder, folder / "sub" / "loop")
    result = scan_folder(folder)
    assert [r.rel_path for r in result.records] == ["top.png", "sub/x.png"]
    assert dict(result.problems)["sub/loop"].startswith("symlink loop")
    assert [r.rel_path for r in scan_folder(folder, recursive=False).records] == ["top.png"]
    images, _ = walk_images(folder)
    assert images == [folder / "top.png", folder / "sub" / "x.png"]


def test_symlinked_file_stays_inside_the_root(tmp_path):
    outside = make_image(tmp_path / "elsewhere" / "real.png", 32, 32)
    (tmp_path / "imgs").mkdir()
    os.symlink(outside, tmp_path / "imgs" / "link.png")
    [record] = scan_folder(tmp_path / "imgs").records
    assert record.rel_path == "link.png" and record.path == tmp_path / "imgs" / "link.png"


def test_unreadable_folder_is_reported(tmp_path, monkeypatch):
    make_image(tmp_path / "imgs" / "a.png", 32, 32)
    make_image(tmp_path / "imgs" / "locked" / "b.png", 32, 32)
    # Root reads any folder whatever its mode (CI runs as root), so the folder refuses the way a
    # permission error reaches os.walk: from os.scandir.
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = scan_folder(tmp_path / "imgs")
    assert dict(result.problems)["locked"].startswith("cannot read folder: Permission denied")
    assert [r.rel_path for r in result.records] == ["a.png"]


def test_png_orientation_is_read_from_the_header_without_decoding(tmp_path, count_decodes):
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (50, 30)).save(tmp_path / "r.png", exif=exif)
    count_decodes.clear()
    assert scan.read_header(tmp_path / "r.png") == (50, 30, 8, "RGB")
    assert count_decodes == []
    assert scan_folder(tmp_path).records[0].original_size == (50, 30)


def test_an_interrupted_first_scan_keeps_its_progress(tmp_path, monkeypatch):
    for i in range(5):
        make_image(tmp_path / "imgs" / f"{i}.png", 30, 30 + i)
    monkeypatch.setattr(scan, "SAVE_EVERY", 2)
    calls = []
    real = scan.validate_file

    def failing_after_three(path, max_pixels):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(path)
        return real(path, max_pixels)

    monkeypatch.setattr(scan, "validate_file", failing_after_three)
    with pytest.raises(KeyboardInterrupt):
        scan_folder(tmp_path / "imgs", validation_cache=tmp_path / "v.json")
    monkeypatch.setattr(scan, "validate_file", real)
    assert scan_folder(tmp_path / "imgs", validation_cache=tmp_path / "v.json").decoded == 3  # 2 were saved


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_named_like_an_image_is_skipped_not_read(tmp_path):
    make_image(tmp_path / "good.png", 40, 60)
    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would wait for a writer forever
    (tmp_path / "link.png").symlink_to(tmp_path / "pipe.png")  # followed: a link to a FIFO is one too
    result = scan_folder(tmp_path)
    assert [r.rel_path for r in result.records] == ["good.png"]
    reasons = dict(result.problems)
    assert set(reasons) == {"pipe.png", "link.png"}
    assert reasons["pipe.png"].startswith("not a regular file (a FIFO (named pipe)): skipped")


def test_names_that_are_not_utf8_are_named_and_skipped(tmp_path):
    make_image(tmp_path / "good.png", 40, 60)
    make_image(tmp_path / "other.png", 40, 60, color=(1, 2, 3))
    os.rename(tmp_path / "other.png", os.fsencode(tmp_path) + b"/bad\xff.png")
    os.mkdir(os.fsencode(tmp_path) + b"/dir\xfe")
    make_image(tmp_path / "inside.png", 40, 60, color=(4, 5, 6))
    os.rename(tmp_path / "inside.png", os.fsencode(tmp_path) + b"/dir\xfe/inside.png")
    result = scan_folder(tmp_path)
    assert [r.rel_path for r in result.records] == ["good.png"]
    reasons = dict(result.problems)
    assert set(reasons) == {"bad\\xff.png", "dir\\xfe"}  # printable: the byte as an escape
    assert reasons["bad\\xff.png"].startswith("file name is not valid UTF-8")
    assert reasons["dir\\xfe"].startswith("folder name is not valid UTF-8")
    json.dumps(result.problems, ensure_ascii=False).encode("utf-8")  # the report can be written
