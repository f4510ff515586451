"""What a checkpoint folder must hold: `files.json` lists each file with its size and sha256, written
just before the completion marker; resume verifies the list, refuses pickles, and picks the newest
intact checkpoint, saying which files of a newer one are damaged.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import tomllib

from finetune.errors import CheckpointError

MANIFEST = "files.json"
FORMAT = 1
PICKLE_FREE, FSDP_STATE = "safetensors+json", "accelerate-fsdp"  # how the training state was saved
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt")
# Accelerate's pickled state: a folder holding these (and no files.json) was written before format 1.
OLD_STATE = re.compile(r"^(random_states_\d+\.pkl|custom_checkpoint_\d+\.pkl|optimizer(_\d+)?\.bin|scheduler(_\d+)?\.bin)$")
_SAID: set[str] = set()
_CHECKED: dict[tuple, list[str]] = {}  # (folder, each file's name, size, mtime) -> its problems


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def write_manifest(folder: Path, pending: dict[str, str], state: str = PICKLE_FREE) -> None:
    """`files.json`: every file in `folder` plus `pending` ({name: text} still to be written, the
    completion marker), each with size and sha256. `state` says how the training state was saved."""
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in _files(folder) if p.name != MANIFEST}
    for name, text in pending.items():
        data = text.encode("utf-8")
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"format": FORMAT, "state": state, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def read_manifest(folder: Path) -> dict:
    """The parsed `files.json`.

    Raises:
        CheckpointError: missing or unparsable (names the file).
    """
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: unreadable (no file list)")
    return manifest


def looks_pickled(path: Path) -> bool:
    """A pickle by its name, or by its first bytes (pickle protocol 2-5, or torch.save's zip)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    if path.suffix == ".safetensors":
        return False  # starts with its header's length, any byte; read by safetensors only
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") or head == b"PK\x03\x04"


def refuse_pickles(folder: Path) -> None:
    """Raise before anything in `folder` is read if it holds a pickle: nothing here unpickles. (An FSDP
    checkpoint's shards are pickled by torch.distributed.checkpoint; only an FSDP run loads them.)

    Raises:
        CheckpointError: naming the pickles; for a checkpoint of an earlier version, how to go on.
    """
    if fsdp_state(folder):
        return
    pickles = [p.relative_to(folder).as_posix() for p in _files(folder) if looks_pickled(p)]
    if not pickles:
        return
    if not (folder / MANIFEST).is_file() and any(OLD_STATE.match(name) for name in pickles):
        raise CheckpointError(
            f"{folder}: written by an earlier version of the toolkit, whose checkpoints hold pickles "
            f"({', '.join(pickles)}); loading them could run code, so they are not loaded. Start a new run "
            f"(another output.dir) from its weights with lora.init_from = \"{_weights_hint(folder)}\"")
    raise CheckpointError(
        f"{folder}: holds pickle files ({', '.join(pickles)}) that this toolkit never writes; loading them "
        "could run code, so this checkpoint is refused. Remove them if you trust the folder's source, or "
        "resume from another checkpoint")


def fsdp_state(folder: Path) -> bool:
    """Whether `files.json` says the state was saved by Accelerate for FSDP (sharded, pickled)."""
    try:
        return read_manifest(folder).get("state") == FSDP_STATE
    except CheckpointError:
        return False


def _weights_hint(folder: Path) -> str:
    state = ("trainable_", "training_state", "rng_")
    usable = [p for p in folder.glob("*.safetensors") if not p.name.startswith(state)]
    return str(usable[0] if usable else folder / "<name>.safetensors")


def damaged_files(folder: Path) -> list[str]:
    """What is wrong with `folder`: each line names a file; empty when every listed file is intact.

    Sizes are compared first (cheap), then hashes; the JSON and TOML files are parsed too. A folder
    is hashed once per process while its files are unchanged (resume looks it up several times).
    """
    stats = tuple((p.as_posix(), s.st_size, s.st_mtime_ns) for p in _files(folder) for s in [p.stat()])
    key = (str(folder), stats)
    if key not in _CHECKED:
        _CHECKED[key] = _check(folder)
    return list(_CHECKED[key])


def _check(folder: Path) -> list[str]:
    try:
        manifest = read_manifest(folder)
    except CheckpointError as err:
        return [str(err)]
    problems = []
    for name, entry in sorted(manifest["files"].items()):
        path = folder / name
        if not isinstance(entry, dict) or Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"{folder / MANIFEST}: lists {name!r} as {entry!r}, not a file of this checkpoint")
        elif not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != entry.get("size"):
            problems.append(f"{path}: {path.stat().st_size} bytes, {entry.get('size')} when saved (truncated or changed)")
        elif _sha256(path) != entry.get("sha256"):
            problems.append(f"{path}: its contents changed since it was saved (sha256 differs)")
        elif path.suffix in (".json", ".toml") and (problem := _unparsable(path)):
            problems.append(f"{path}: {problem}")
    return problems


def _unparsable(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
        json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (UnicodeDecodeError, ValueError) as err:
        return f"unparsable ({err})"
    return ""


def check_intact(folder: Path) -> None:
    """Raise unless `folder` is an intact checkpoint of this format, without pickles.

    Raises:
        CheckpointError: naming the pickles or the damaged files.
    """
    refuse_pickles(folder)
    problems = damaged_files(folder)
    if problems:
        raise CheckpointError(f"{folder}: damaged, cannot resume from it:\n  " + "\n  ".join(problems)
                              + "\nresume with --resume (the newest intact checkpoint) or name another one")


def resume_candidate(complete: list[Path], pointed: Path | None = None) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint among `complete` (oldest first; `pointed`, the one `latest` names,
    is tried first), and notes saying which newer ones are damaged and that an older one is used.

    Raises:
        CheckpointError: a checkpoint holds pickles (never skipped: someone put them there), or every
            checkpoint is damaged (naming the damaged files).
    """
    order = list(reversed(complete))
    if pointed is not None and pointed in order:
        order.remove(pointed)
        order.insert(0, pointed)
    notes, damage = [], []
    for folder in order:
        refuse_pickles(folder)
        problems = damaged_files(folder)
        if not problems:
            if damage:
                notes.append(f"resuming from {folder}, the newest intact checkpoint")
            return folder, notes
        damage.extend(problems)
        notes.append(f"{folder} is damaged, skipped:\n  " + "\n  ".join(problems))
    if damage:
        raise CheckpointError("no intact checkpoint to resume from:\n  " + "\n  ".join(damage)
                              + "\nstart a new run (another output.dir), or restore the damaged files")
    return None, notes


def say_once(notes: list[str]) -> None:
    """Print each note once per process (the resume folder is looked up more than once)."""
    for note in notes:
        if note not in _SAID:
            _SAID.add(note)
            print(note, flush=True)
