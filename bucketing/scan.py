"""Finding images in a folder, reading their sizes from headers, and validating each new file once."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from bucketing.image import IMAGE_EXTENSIONS, open_image

MASK_SUFFIX = "_mask"
PREFIX_BYTES = 64 * 1024
# EXIF orientations 5-8 rotate by 90°: the image as seen has height and width swapped.
SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


@dataclass(frozen=True)
class ImageRecord:
    path: Path  # absolute
    rel_path: str  # posix, relative to the scanned root
    original_size: tuple[int, int]  # (h, w) as seen, after EXIF orientation
    fingerprint: str  # size + mtime + content-hash prefix
    mask_path: str = ""


@dataclass
class ScanResult:
    records: list[ImageRecord] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): skipped
    notes: list[tuple[str, str]] = field(default_factory=list)  # (path, what was done): kept
    decoded: int = 0  # files fully decoded by this scan (0 when every file was validated before)


def walk_images(root: Path, recursive: bool = True) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files under `root`, sorted; symlink loops are reported, not followed forever."""
    found, problems, seen_dirs = [], [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen_dirs:
            problems.append((folder, "symlink loop: folder already visited, skipped"))
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs.sort()
        if not recursive:
            dirs[:] = []
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(folder) / name)
    return found, problems


def split_masks(paths: list[Path]) -> tuple[list[Path], dict[Path, Path]]:
    """Separate `x_mask.png` files from images; map each image to its mask (same stem + _mask)."""
    masks = {p.with_name(p.stem[: -len(MASK_SUFFIX)]): p for p in paths if p.stem.endswith(MASK_SUFFIX)}
    images = [p for p in paths if not p.stem.endswith(MASK_SUFFIX)]
    by_stem = {}
    for image in images:
        mask = masks.get(image.with_suffix(""))
        if mask is not None:
            by_stem[image] = mask
    return images, by_stem


def fingerprint(path: Path) -> str:
    """size-mtime-hash of the first 64 KiB: changes whenever the file does, without reading all of it."""
    stat = path.stat()
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read(PREFIX_BYTES)).hexdigest()[:16]
    return f"{stat.st_size}-{stat.st_mtime_ns}-{digest}"


def read_header(path: Path) -> tuple[int, int, int, str]:
    """(height, width as seen, EXIF orientation, mode) from the header only: no pixel decode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            width, height, mode = image.width, image.height, image.mode
            orientation = image.getexif().get(0x0112, 1) if hasattr(image, "getexif") else 1
    if orientation in SWAPPING_ORIENTATIONS:
        height, width = width, height
    return height, width, orientation, mode


def validate_file(path: str, max_pixels: int) -> dict:
    """Decode one file fully; {"ok", "reason", "notes", "size"}. Runs in worker processes."""
    p = Path(path)
    try:
        if p.stat().st_size == 0:
            return {"ok": False, "reason": "empty file (0 bytes)"}
        height, width, orientation, mode = read_header(p)
        if height * width > max_pixels:
            return {"ok": False, "reason": f"{width}x{height} pixels is over the limit of {max_pixels} "
                                           "(dataset.max_pixels; a decompression bomb or a huge scan)"}
        open_image(p)  # full decode: catches truncated and corrupt data now, not at step 40,000
    except Image.DecompressionBombError:
        return {"ok": False, "reason": "over Pillow's decompression-bomb limit"}
    except UnidentifiedImageError:
        return {"ok": False, "reason": "not an image (unrecognised data with an image extension)"}
    except (OSError, SyntaxError, ValueError) as err:
        return {"ok": False, "reason": f"unreadable or truncated image: {err}"}
    notes = []
    if orientation != 1:
        notes.append(f"EXIF orientation {orientation} applied")
    if mode not in ("RGB", "L"):
        notes.append(f"converted from {mode} to RGB" + (" (alpha composited on the background colour)"
                                                         if mode in ("RGBA", "LA", "PA", "P") else ""))
    return {"ok": True, "reason": None, "notes": notes, "size": [height, width]}


class ValidationCache:
    """Validation results by fingerprint in a JSON file: an unchanged file is never decoded twice."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, dict] = {}
        if path is not None and path.is_file():
            try:
                self.entries = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.entries = {}  # a damaged cache only costs a re-validation

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries), encoding="utf-8")
        os.replace(tmp, self.path)


def validate_all(paths: list[Path], prints: list[str], max_pixels: int, cache: ValidationCache) -> Iterator[dict]:
    """Validation results in `paths` order; new files decoded in worker processes when there are many."""
    new = [(str(p), fp) for p, fp in zip(paths, prints) if fp not in cache.entries]
    if len(new) >= 64 and (os.cpu_count() or 1) > 1:
        with ProcessPoolExecutor() as pool:
            results = list(pool.map(validate_file, [p for p, _ in new], [max_pixels] * len(new), chunksize=16))
    else:
        results = [validate_file(p, max_pixels) for p, _ in new]
    for (_, fp), result in zip(new, results):
        cache.entries[fp] = result
    for fp in prints:
        yield cache.entries[fp]


def scan_folder(root: Path, *, recursive: bool = True, max_pixels: int = 178_956_970, min_original_side: int = 0,
                validation_cache: Path | None = None) -> ScanResult:
    """Every usable image under `root` with its size and fingerprint; unusable files listed with the reason."""
    root = Path(root)
    paths, walk_problems = walk_images(root, recursive)
    images, masks = split_masks(paths)
    result = ScanResult(problems=list(walk_problems))
    cache = ValidationCache(validation_cache)
    before = len(cache.entries)
    prints, usable = [], []
    for path in images:
        try:
            prints.append(fingerprint(path))
            usable.append(path)
        except OSError as err:
            result.problems.append((str(path), f"cannot read: {err}"))
    checks = list(validate_all(usable, prints, max_pixels, cache))
    # Only files of equal byte size can be exact duplicates: hash just those, not the whole folder.
    sizes = Counter(fp.split("-")[0] for fp in prints)
    seen_content: dict[str, str] = {}
    for path, fp, check in zip(usable, prints, checks):
        rel = path.relative_to(root).as_posix()
        if not check["ok"]:
            result.problems.append((rel, check["reason"]))
            continue
        height, width = check["size"]
        if min(height, width) < min_original_side:
            result.problems.append((rel, f"too small: {width}x{height}, shorter side under "
                                         f"dataset.min_original_side = {min_original_side}"))
            continue
        if sizes[fp.split("-")[0]] > 1:
            digest = _content_hash(path)
            if digest in seen_content:
                result.notes.append((rel, f"exact duplicate of {seen_content[digest]}: kept once"))
                continue
            seen_content[digest] = rel
        result.notes.extend((rel, note) for note in check["notes"])
        mask = masks.get(path)
        result.records.append(ImageRecord(path.resolve(), rel, (height, width), fp,
                                          str(mask.resolve()) if mask else ""))
    result.decoded = len(cache.entries) - before
    cache.save()
    return result


def _content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
