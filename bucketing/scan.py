"""Finding images in a folder, reading their sizes from headers, and validating each new file once."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import stat
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from bucketing.image import IMAGE_EXTENSIONS, open_image, pixel_limit

MASK_SUFFIX = "_mask"
PREFIX_BYTES = 64 * 1024
# EXIF orientations 5-8 rotate by 90°: the image as seen has height and width swapped.
SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
# Image formats we do not train on: listed as problems instead of being passed over in silence.
UNSUPPORTED_EXTENSIONS = (".gif", ".heic", ".heif", ".avif", ".jxl", ".psd", ".svg", ".dng", ".cr2", ".nef")
# Below this many new files, starting worker processes costs more than it saves.
PARALLEL_MIN_FILES = 64
CACHE_VERSION = 1
SAVE_EVERY = 2000  # decodes between saves of the validation cache during a long first scan


@dataclass(frozen=True)
class ImageRecord:
    path: Path  # absolute, symlinks not resolved (so it stays inside the scanned root)
    rel_path: str  # posix, relative to the scanned root
    original_size: tuple[int, int]  # (h, w) as seen, after EXIF orientation
    fingerprint: str  # size + mtime + content-hash prefix
    mask_path: str = ""  # absolute path of img_mask.*, "" when none


@dataclass
class ScanResult:
    records: list[ImageRecord] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): skipped
    notes: list[tuple[str, str]] = field(default_factory=list)  # (path, what was done): kept
    decoded: int = 0  # files fully decoded by this scan (0 when every file was validated before)


def walk_images(root: Path, recursive: bool = True) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files under `root` (sorted, folder by folder) and problems: symlink loops, unreadable
    folders, image formats we do not take, names that are not UTF-8, files that are not regular files
    (a FIFO named `x.png` would block the first read forever). Symlinked folders are followed, each
    real folder once."""
    root = Path(root)
    found: list[Path] = []
    problems: list[tuple[str, str]] = []
    seen_dirs: set[str] = set()

    def unreadable(err: OSError) -> None:
        problems.append((_shown(err.filename, root), f"cannot read folder: {err.strerror}; check its permissions"))

    for folder, dirs, files in os.walk(root, followlinks=True, onerror=unreadable):
        real = os.path.realpath(folder)
        if real in seen_dirs:
            problems.append((_shown(folder, root), "symlink loop (or a second link to a folder already "
                                                   "scanned): skipped"))
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs[:] = [name for name in sorted(dirs) if _utf8_name(os.path.join(folder, name), root, problems)
                   ] if recursive else []
        for name in sorted(files):
            lower = name.lower()
            path = os.path.join(folder, name)
            if lower.endswith(IMAGE_EXTENSIONS):
                if _utf8_name(path, root, problems) and _regular_file(path, root, problems):
                    found.append(Path(path))
            elif lower.endswith(UNSUPPORTED_EXTENSIONS):
                problems.append((_shown(path, root), "unsupported image format: convert it to PNG, JPEG or WebP"))
    return found, problems


def _utf8_name(path: str, root: Path, problems: list[tuple[str, str]]) -> bool:
    """False, with a problem listed, when the last part of `path` is not valid UTF-8 (the manifest
    stores names as UTF-8; os.walk hands such bytes over as lone surrogates)."""
    try:
        os.path.basename(path).encode("utf-8")
        return True
    except UnicodeEncodeError:
        what = "folder" if os.path.isdir(path) else "file"
        problems.append((_shown(path, root), f"{what} name is not valid UTF-8 (the manifest stores names as "
                                             f"UTF-8): skipped; rename it"))
        return False


def _regular_file(path: str, root: Path, problems: list[tuple[str, str]]) -> bool:
    """False, with a problem listed, for a FIFO, socket or device (after following symlinks)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return True  # a broken link: fingerprint() names it with the reason
    if stat.S_ISREG(mode):
        return True
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
    problems.append((_shown(path, root), f"not a regular file ({kind}): skipped, reading it could wait forever; "
                                         "remove it from the image folder"))
    return False


def _shown(path: str, root: Path) -> str:
    """A path as reports show it: relative to the scanned root when inside it; bytes that are not
    UTF-8 in a name are shown as \\xNN escapes, so the report can be printed and written."""
    try:
        shown = Path(path).relative_to(root).as_posix() or "."
    except ValueError:
        shown = str(path)
    return shown.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def split_masks(paths: list[Path]) -> tuple[list[Path], dict[Path, Path]]:
    """Separate masks from images: `x_mask.png` is the mask of `x.*` when such an image exists
    (otherwise it is an ordinary image, say a photo of a face mask). Returns (images, image -> mask)."""
    stems: dict[Path, list[Path]] = {}
    for path in paths:
        stems.setdefault(path.with_suffix(""), []).append(path)
    masks: dict[Path, Path] = {}
    mask_files: set[Path] = set()
    for path in paths:
        if not path.stem.endswith(MASK_SUFFIX):
            continue
        owners = [p for p in stems.get(path.with_name(path.stem[: -len(MASK_SUFFIX)]), [])
                  if not p.stem.endswith(MASK_SUFFIX)]
        for owner in owners:
            masks[owner] = path
        if owners:
            mask_files.add(path)
    return [p for p in paths if p not in mask_files], masks


def fingerprint(path: Path) -> str:
    """size-mtime-hash of the first 64 KiB: changes whenever the file does, without reading all of it."""
    stat = path.stat()
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read(PREFIX_BYTES)).hexdigest()[:16]
    return f"{stat.st_size}-{stat.st_mtime_ns}-{digest}"


def read_header(path: Path) -> tuple[int, int, int, str]:
    """(height, width as seen, EXIF orientation, mode) from the header only: no pixel decode."""
    with Image.open(path) as image:
        width, height, mode = image.width, image.height, image.mode
        # PNG's getexif decodes the whole image to find an eXIf chunk after the pixels; the base
        # method reads only what the header gave (the decode below catches a late chunk).
        exif = Image.Image.getexif(image) if image.format == "PNG" else image.getexif()
        orientation = exif.get(0x0112, 1)
    if orientation in SWAPPING_ORIENTATIONS:
        height, width = width, height
    return height, width, orientation, mode


def validate_file(path: str, max_pixels: int) -> dict:
    """Decode one file fully; {"ok", "reason", "notes", "size", "over_limit"}. Runs in worker processes.

    The size checked against `max_pixels` comes from the header, before any decode; the size
    recorded is the decoded one, as training will see it.
    """
    p = Path(path)
    try:
        if p.stat().st_size == 0:
            return {"ok": False, "reason": "empty file (0 bytes)"}
        with pixel_limit(max_pixels):
            height, width, orientation, mode = read_header(p)
            if height * width > max_pixels:
                return over_limit(height, width, max_pixels)
            image = open_image(p)  # full decode: catches truncated and corrupt data now, not at step 40,000
    except Image.DecompressionBombError as err:
        return {"ok": False, "reason": f"refused as a decompression bomb ({err})"}
    except UnidentifiedImageError:
        return {"ok": False, "reason": "not an image (unrecognised data with an image extension)"}
    except (OSError, SyntaxError, ValueError) as err:
        return {"ok": False, "reason": f"unreadable or truncated image ({err}); re-export or delete it"}
    notes = []
    if (image.height, image.width) != (height, width):
        height, width = image.height, image.width
        notes.append(f"EXIF orientation applied (seen as {height}x{width}, h x w)")
    elif orientation != 1:
        notes.append(f"EXIF orientation {orientation} applied (seen as {height}x{width}, h x w)")
    if mode not in ("RGB", "L"):
        alpha = " (alpha composited on dataset.alpha_color)" if mode in ("RGBA", "LA", "PA", "P") else ""
        notes.append(f"converted from {mode} to RGB{alpha}")
    return {"ok": True, "reason": None, "notes": notes, "size": [height, width]}


def over_limit(height: int, width: int, max_pixels: int) -> dict:
    return {"ok": False, "over_limit": True, "size": [height, width],
            "reason": f"{width}x{height} pixels is over the limit of {max_pixels} (dataset.max_pixels; "
                      "a decompression bomb or a huge scan): not decoded; shrink it or raise the limit"}


class ValidationCache:
    """Validation results by fingerprint in a JSON file: an unchanged file is never decoded twice.

    A refusal for size is kept only while the limit still refuses it, and a file validated under a
    higher limit is refused from its recorded size, so changing dataset.max_pixels needs no decode.
    """

    def __init__(self, path: Path | None):
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, dict] = {}
        self.used: set[str] = set()
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if data.get("version") == CACHE_VERSION:
                    self.entries = dict(data["entries"])
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
                self.entries = {}  # a damaged cache only costs a re-validation

    def lookup(self, print_: str, max_pixels: int) -> dict | None:
        """The stored result under this limit, or None when the file must be (re)decoded."""
        entry = self.entries.get(print_)
        if entry is None:
            return None
        size = entry.get("size")
        if entry.get("over_limit"):
            return entry if size[0] * size[1] > max_pixels else None
        if entry["ok"] and size[0] * size[1] > max_pixels:
            return over_limit(size[0], size[1], max_pixels)
        return entry

    def save(self, prune: bool = False) -> None:
        """Write atomically; with `prune`, keep only the entries looked up since loading."""
        if self.path is None:
            return
        entries = {k: v for k, v in self.entries.items() if k in self.used} if prune else self.entries
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}), encoding="utf-8")
        os.replace(tmp, self.path)


def validate_all(paths: list[Path], prints: list[str], max_pixels: int,
                 cache: ValidationCache) -> tuple[list[dict], int]:
    """(validation results in `paths` order, files decoded); new files are decoded in worker
    processes when there are many, and the cache is saved now and then so an interrupted first
    scan of a big folder keeps what it did."""
    results = [cache.lookup(fp, max_pixels) for fp in prints]
    todo = [i for i, r in enumerate(results) if r is None]
    for done, (i, result) in enumerate(zip(todo, _decode_many([str(paths[i]) for i in todo], max_pixels)), 1):
        cache.entries[prints[i]] = results[i] = result
        if done % SAVE_EVERY == 0:
            cache.save()
    cache.used.update(prints)
    return results, len(todo)


def _decode_many(paths: list[str], max_pixels: int) -> Iterator[dict]:
    """validate_file over `paths`, in order, as results arrive."""
    workers = min(os.cpu_count() or 1, 8)
    if len(paths) < PARALLEL_MIN_FILES or workers < 2:
        yield from (validate_file(p, max_pixels) for p in paths)
        return
    # "spawn": the caller may hold threads (torch, tokenizers) that make fork unsafe.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield from pool.map(validate_file, paths, [max_pixels] * len(paths), chunksize=16)


def scan_folder(root: Path, *, recursive: bool = True, max_pixels: int = 178_956_970, min_original_side: int = 0,
                validation_cache: Path | ValidationCache | None = None) -> ScanResult:
    """Every usable image under `root` with its size and fingerprint; unusable files listed with the reason.

    Nothing under `root` is written. `validation_cache` (a JSON path, or a shared ValidationCache that
    the caller saves) remembers decode results so an unchanged file is decoded once, ever.
    """
    root = Path(root)
    paths, problems = walk_images(root, recursive)
    images, masks = split_masks(paths)
    result = ScanResult(problems=problems)
    cache = validation_cache if isinstance(validation_cache, ValidationCache) else ValidationCache(validation_cache)
    files = sorted(set(images) | set(masks.values()), key=images_first(images))
    prints: dict[Path, str] = {}
    for path in files:
        try:
            prints[path] = fingerprint(path)
        except OSError as err:
            result.problems.append((_shown(str(path), root), f"cannot read: {err.strerror or err}"))
    checked, result.decoded = validate_all(list(prints), list(prints.values()), max_pixels, cache)
    checks = dict(zip(prints, checked))
    duplicates = DuplicateFinder(list(prints.values()))
    for path in images:
        if path in checks:
            _keep_or_report(path, root, prints[path], checks, masks, min_original_side, duplicates, result)
    if not isinstance(validation_cache, ValidationCache):
        cache.save()
    return result


def images_first(images: list[Path]):
    order = {p: i for i, p in enumerate(images)}
    return lambda p: (order.get(p, len(order)), str(p))


def _keep_or_report(path: Path, root: Path, print_: str, checks: dict[Path, dict], masks: dict[Path, Path],
                    min_original_side: int, duplicates: DuplicateFinder, result: ScanResult) -> None:
    """Append `path` to the records, or its reason to the problems."""
    rel = path.relative_to(root).as_posix()
    check = checks[path]
    if not check["ok"]:
        result.problems.append((rel, check["reason"]))
        return
    height, width = check["size"]
    if min(height, width) < min_original_side:
        result.problems.append((rel, f"too small: {width}x{height} (w x h), shorter side under "
                                     f"dataset.min_original_side = {min_original_side}"))
        return
    original = duplicates.first_with_same_content(path, print_, rel)
    if original is not None:
        result.problems.append((rel, f"exact duplicate of {original}: skipped, the image is kept once"))
        return
    result.notes.extend((rel, note) for note in check["notes"])
    mask_path = _usable_mask(path, root, (height, width), checks, masks, result)
    result.records.append(ImageRecord(Path(os.path.abspath(path)), rel, (height, width), print_, mask_path))


def _usable_mask(path: Path, root: Path, size: tuple[int, int], checks: dict[Path, dict],
                 masks: dict[Path, Path], result: ScanResult) -> str:
    """The mask's absolute path, or "" (with a problem listed) when it cannot be used for this image."""
    mask = masks.get(path)
    if mask is None:
        return ""
    shown = _shown(str(mask), root)
    check = checks.get(mask)
    if check is None:
        return ""  # unreadable: already listed
    if not check["ok"]:
        result.problems.append((shown, f"mask not used: {check['reason']}"))
        return ""
    if tuple(check["size"]) != size:
        mh, mw = check["size"]
        result.problems.append((shown, f"mask not used: it is {mw}x{mh} (w x h) but its image is "
                                       f"{size[1]}x{size[0]}; masks must match their image's size"))
        return ""
    return os.path.abspath(mask)


class DuplicateFinder:
    """Exact duplicates by full content hash; only files sharing a byte size with another are read."""

    def __init__(self, prints: Iterable[str]):
        self.sizes = Counter(fp.split("-")[0] for fp in prints)
        self.seen: dict[str, str] = {}

    def first_with_same_content(self, path: Path, print_: str, rel: str) -> str | None:
        if self.sizes[print_.split("-")[0]] < 2:
            return None
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        key = digest.hexdigest()
        if key in self.seen:
            return self.seen[key]
        self.seen[key] = rel
        return None
