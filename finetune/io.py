"""Files in and out: atomic writes (every file or folder the toolkit produces appears whole or not at
all), the checks an output path passes before any work, and safe reads of the headers and configs of
the files users give the tools (a damaged file is one line naming it, never a traceback)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from finetune.errors import ConfigError, ModelError

HEADER_LIMIT = 100 << 20  # bytes; safetensors refuses larger headers too
DTYPE_SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


# --- outputs -------------------------------------------------------------------------------------

def check_output(out: Path, *, overwrite: bool = False, inputs: Iterable[Path] = (), folder: bool = False,
                 flag: str = "--out") -> None:
    """Refuse, before any work, an output path whose writing would lose the user's data.

    Args:
        inputs: the command's input files and folders; an output equal to one, inside one, or holding
            one is refused even with `overwrite`.
        folder: the command writes a folder (else a file); an existing entry of the other kind is
            refused even with `overwrite`.
        flag: how the message names the path (the CLI option).

    Raises:
        ConfigError: naming the path, and the input it would replace.
    """
    out = Path(out)
    check_not_an_input(out, inputs, flag)
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_dir() != folder:
        have, want = ("a folder", "a file") if out.is_dir() else ("a file", "a folder")
        raise ConfigError(f"{flag} {out}: is {have} and this command writes {want}; choose another {flag}")
    if not overwrite:
        raise ConfigError(f"{flag} {out}: already exists; add --overwrite to replace it, or choose another {flag}")
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"{flag} {out}: holds the current folder, which replacing it would delete; "
                          f"choose another {flag}")


def check_not_an_input(out: Path, inputs: Iterable[Path], flag: str = "--out") -> None:
    """ConfigError naming both paths when `out` (resolved) is an input, lies inside an input folder, or
    is a folder holding an input: writing it would destroy or change the input."""
    target = Path(out).resolve()
    for source in inputs:
        resolved = Path(source).resolve()
        if target == resolved:
            where = "is the input"
        elif resolved.is_relative_to(target):
            where = "is a folder holding the input"
        elif target.is_relative_to(resolved):
            where = "lies inside the input"
        else:
            continue
        raise ConfigError(f"{flag} {out} {where} {source}: write to a new path outside the inputs "
                          "(an input is never written over, --overwrite or not)")


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success it replaces `target` in one rename.

    On error the temp folder is removed and an existing `target` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        _honour_umask(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(source: Path, target: Path) -> None:
    """Put the finished folder `source` in the place of `target` (same file system), replacing it if it exists."""
    source, target = Path(source), Path(target)
    if target.exists():
        # Two renames: the old folder is only removed once the new one is in place.
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)
    _fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; on success it is flushed to disk and renamed onto `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        _honour_umask(tmp)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(target: Path, text: str) -> None:
    with atomic_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _honour_umask(path: Path) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; what we publish gets the modes any other
    program's files get under the user's umask. Inside a published folder, entries created by our own
    code or libraries already follow it."""
    mask = _current_umask()
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def fsync_tree(root: Path) -> None:
    """Flush every file under `root` to disk (before the rename that publishes the folder)."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- reading what users give the tools -----------------------------------------------------------

def read_safetensors_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensor entries, metadata, byte offset of the data) of a .safetensors file, from its header alone.

    What a loader trusts is checked first, so a damaged file never reaches safetensors or torch: the
    8-byte header length against the file's size and HEADER_LIMIT, the JSON, a table of entries each
    with a dtype, a shape of sizes and data offsets inside the file that fit dtype × shape.

    Raises:
        ModelError: naming the file and what is wrong with it.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            length = int.from_bytes(fh.read(8), "little") if size >= 8 else 0
            if size < 8 or length > size - 8 or length > HEADER_LIMIT:
                raise _damaged(path, f"its first 8 bytes announce a {length}-byte header in a {size}-byte file"
                               if size >= 8 else f"only {size} bytes long")
            blob = fh.read(length)
    except OSError as err:
        raise ModelError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        header = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _damaged(path, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _damaged(path, f"its header is a JSON {type(header).__name__}, not a table of tensors")
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _damaged(path, "its __metadata__ is not a table of strings")
    for key, entry in header.items():
        problem = _entry_problem(entry, size - 8 - length)
        if problem:
            raise _damaged(path, f"tensor {key!r}: {problem}")
    return header, metadata, 8 + length


def _entry_problem(entry, data_bytes: int) -> str | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        return "no dtype"
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(type(side) is int and side >= 0 for side in shape)):
        return f"shape {shape!r} is not a list of sizes"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes):
        return f"data_offsets {offsets!r} lie outside the file's {data_bytes} data bytes (truncated?)"
    width = DTYPE_SIZES.get(entry["dtype"])
    if width is not None and math.prod(shape) * width != offsets[1] - offsets[0]:
        return f"shape {shape} of {entry['dtype']} does not fit its {offsets[1] - offsets[0]} bytes"
    return None


def _damaged(path: Path, why: str) -> ModelError:
    return ModelError(f"{path}: not a readable .safetensors file ({why}); it is damaged or of another "
                      "format: download or export it again")


def read_json_object(path: Path) -> dict:
    """A JSON file holding one object (a diffusers or transformers config.json).

    Raises:
        ModelError: naming the file when it cannot be read, is not JSON, or holds no object.
    """
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ModelError(f"{path}: cannot be read ({err.strerror or err})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ModelError(f"{path}: not valid JSON ({err}); restore the file from the model's source") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: holds a JSON {type(value).__name__}, not the object a config is; "
                         "restore the file from the model's source")
    return value
