"""An image's caption: sidecar file, then metadata.jsonl, then the subset's prompt, then the folder name."""

from __future__ import annotations

import codecs
import json
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

# A prefix ending in one of these is joined to the caption with a space instead of ", ".
PREFIX_SEPARATORS = ",;:."
# kohya's folder convention: "<repeats>_<caption>", e.g. "10_sks dog".
_REPEATS_FOLDER = re.compile(r"^(\d+)_(.*)$")


class CaptionError(ValueError):
    """A caption source cannot be read; names the file (and line)."""


@dataclass(frozen=True)
class CaptionResult:
    text: str
    source: str  # "sidecar", "metadata", "prompt", "folder" or "empty"
    note: str | None = None


def clean_caption(text: str) -> str:
    """One line: newlines, tabs and runs of spaces become single spaces; a stray BOM is dropped."""
    return " ".join(text.replace("\ufeff", "").split())


def decode_caption_bytes(raw: bytes) -> tuple[str, str | None]:
    """(text, None) for UTF-8 (BOM or not) and BOM-marked UTF-16; else (cp1252 text, "cp1252")."""
    # Windows Notepad's "Unicode" is UTF-16 with a BOM; read as cp1252 it would be NUL-riddled noise.
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16"), None
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        # cp1252 leaves five bytes undefined; they become U+FFFD rather than failing the whole dataset.
        return raw.decode("cp1252", errors="replace"), "cp1252"


def read_sidecar(image_path: Path, caption_ext: str = ".txt") -> tuple[str | None, str | None]:
    """The caption in the file beside `image_path` ("img.png" -> "img.txt") and a note, or (None, None).

    UTF-8 (a BOM is stripped); a file that is not UTF-8 is read as cp1252 and the note says so.
    Whitespace and newlines collapse to single spaces. An empty file gives ("", note).
    """
    path = Path(image_path).with_suffix(caption_ext)
    if not path.is_file():
        return None, None
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CaptionError(f"{path}: caption file cannot be read ({err.strerror or err})") from None
    text, encoding = decode_caption_bytes(raw)
    text = clean_caption(text)
    if encoding is not None:
        return text, f"{path}: not UTF-8, read as {encoding}; save it as UTF-8 to be sure of the characters"
    if not text:
        return "", f"{path}: caption file is empty"
    return text, None


def read_metadata_jsonl(folder: Path, text_column: str = "text") -> dict[str, str]:
    """Captions from `folder/metadata.jsonl` (the `datasets` imagefolder convention), or {} without one.

    Each line is a JSON object with `file_name` (relative to `folder`) and `text_column`.
    Returns {posix path relative to folder: caption}.

    Raises:
        CaptionError: a line is not such an object, or names a file twice; the message has file:line.
    """
    path = Path(folder) / "metadata.jsonl"
    if not path.is_file():
        return {}
    captions: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            raise CaptionError(f"{where}: not UTF-8; save metadata.jsonl as UTF-8") from None
        if not line.strip():
            continue
        name, text = _metadata_entry(line, where, text_column)
        if name in first_line:
            raise CaptionError(f"{where}: {name!r} already has a caption on line {first_line[name]}; keep one")
        first_line[name] = number
        captions[name] = text
    return captions


def _metadata_entry(line: str, where: str, text_column: str) -> tuple[str, str]:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as err:
        raise CaptionError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(entry, dict):
        raise CaptionError(f"{where}: expected a JSON object with file_name and {text_column}")
    name = entry.get("file_name")
    if not isinstance(name, str) or not name.strip():
        raise CaptionError(f"{where}: no file_name (the image path relative to the folder)")
    if text_column not in entry:
        keys = ", ".join(sorted(entry)) or "none"
        raise CaptionError(f"{where}: no {text_column!r} key (keys: {keys})")
    text = entry[text_column]
    if text is not None and not isinstance(text, (str, int, float)):
        raise CaptionError(f"{where}: {text_column} must be a string, got {type(text).__name__}")
    return metadata_key(name), clean_caption("" if text is None else str(text))


def metadata_key(file_name: str) -> str:
    """A metadata.jsonl `file_name` as the key of the image it names: posix (paths written on Windows
    use backslashes), with `./` and `sub/..` folded away, so it compares with a scan's relative paths."""
    return posixpath.normpath(file_name.replace("\\", "/"))


def unused_metadata_lines(folder: Path, used: set[str], reported: set[str] = frozenset()) -> list[tuple[str, str]]:
    """(`metadata.jsonl:LINE`, why) for each line of `folder/metadata.jsonl` whose file_name names no image
    in `used` (the relative paths the scan kept): a path outside the folder, a missing file, or a file the
    scan does not train on. Lines naming a path in `reported` (files the scan skipped, with their reason
    already listed) are left out. Lines read_metadata_jsonl refuses are not looked at here."""
    path = Path(folder) / "metadata.jsonl"
    if not path.is_file():
        return []
    unused = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            name = json.loads(raw.decode("utf-8-sig")).get("file_name")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue
        if not isinstance(name, str) or not name.strip():
            continue
        key = metadata_key(name)
        if key in used or key in reported:
            continue
        if posixpath.isabs(key) or key == ".." or key.startswith("../") or re.match(r"^[A-Za-z]:", key):
            why = (f"file_name {name!r} is outside the image folder {folder}: its caption is not used; "
                   "name images by their path inside the folder (e.g. sub/x.png)")
        elif not (Path(folder) / key).exists():
            why = f"file_name {name!r}: no such file in {folder}; fix the name or remove the line"
        else:
            why = (f"file_name {name!r} is not an image this subset trains on (not an image file, a mask, or in a "
                   "sub-folder while recursive = false): its caption is not used")
        unused.append((f"{path}:{number}", why))
    return unused


def folder_caption(image_path: Path, root: Path) -> str:
    """kohya's folder convention: the nearest folder named "<repeats>_<caption>" ("10_sks dog" -> "sks dog"),
    looking from the image's folder up to `root` (included); else the image's folder name."""
    match = _kohya_folder(image_path, root)
    return match.group(2).strip() if match else Path(image_path).parent.name.strip()


def folder_repeats(image_path: Path, root: Path) -> int | None:
    """The <repeats> of the nearest kohya "<repeats>_<caption>" folder (as folder_caption finds it), else None."""
    match = _kohya_folder(image_path, root)
    return int(match.group(1)) if match else None


def _kohya_folder(image_path: Path, root: Path) -> re.Match | None:
    image_path, root = Path(image_path), Path(root)
    folder = image_path.parent
    levels_below_root = len(Path(_relative_key(image_path, root)).parts) - 1
    for candidate in (folder, *folder.parents[:levels_below_root]):
        match = _REPEATS_FOLDER.match(candidate.name)
        if match:
            return match
    return None


def join_prefix(prefix: str, text: str) -> str:
    """`prefix` put before `text`: "prefix, text", or "prefix text" when the prefix ends in a separator.

    A caption that already starts with the prefix (say, one written by `finetune caption --prefix`)
    is not given it twice.
    """
    prefix = prefix.strip()
    core = prefix.rstrip(PREFIX_SEPARATORS).strip()
    if not core:
        return text
    if not text:
        return core
    if text.startswith(core) and text[len(core):][:1] in ("", *PREFIX_SEPARATORS):
        return text
    return f"{prefix} {text}" if prefix[-1] in PREFIX_SEPARATORS else f"{prefix}, {text}"


def resolve_caption(image_path: Path, root: Path, *, caption_ext: str = ".txt", metadata: dict[str, str] | None = None,
                    instance_prompt: str | None = None, class_prompt: str | None = None,
                    is_regularization: bool = False, caption_prefix: str = "") -> CaptionResult:
    """The caption of one image from the first source that has one, with the subset's prefix in front.

    Order: sidecar file, `metadata` (from read_metadata_jsonl, keyed by path relative to `root`), the
    subset prompt (class_prompt for regularization images, instance_prompt otherwise), the folder name.
    An empty sidecar or metadata caption is kept as the empty caption (source "empty"), with a note.
    """
    image_path, root = Path(image_path), Path(root)
    text, note = read_sidecar(image_path, caption_ext)
    source = "sidecar"
    if text is None and metadata:
        text = metadata.get(_relative_key(image_path, root))
        source = "metadata"
        if text == "":
            key = _relative_key(image_path, root)
            note = f"{key}: its metadata caption (metadata.jsonl or dataset column) is empty"
    if text is None:
        prompt = class_prompt if is_regularization else instance_prompt
        text, source = (clean_caption(prompt), "prompt") if prompt else (folder_caption(image_path, root), "folder")
    if not text:
        text, source = "", "empty"
    if caption_prefix:
        text = join_prefix(caption_prefix, text)
    return CaptionResult(text, source, note)


def _relative_key(image_path: Path, root: Path) -> str:
    try:
        return image_path.relative_to(root).as_posix()
    except ValueError:
        # One path absolute and the other relative (or via a symlink): compare them resolved.
        try:
            return image_path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            raise CaptionError(f"{image_path}: not inside the dataset folder {root}") from None
