"""The sharded safetensors store: shards written atomically as they fill, checked on open, indexed last.

Layout of a cache folder:
    <kind>-<run>-r<rank>-<n>.safetensors        tensors named "<key>/<field>"
    <kind>-<run>-r<rank>-<n>.safetensors.json   the shard's record, written right after the shard
    index.json                                  every valid shard's record, written at the end of a build

A record holds the shard's byte size, sha256 and entries ({key: [fields]}). A build that is
interrupted leaves whole shards with their records (but no index): the next build finds them and
reuses them. A shard whose size or hash no longer matches is dropped and its entries rebuilt.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from finetune.errors import FinetuneError
from finetune.io import atomic_file, write_text_atomic

log = logging.getLogger(__name__)

INDEX = "index.json"
FORMAT = "finetune-cache/1"
RECORD_SUFFIX = ".json"


class CacheError(FinetuneError):
    """A cache folder is missing, damaged or was built for something else; names the folder and the fix."""


@dataclass
class CacheStats:
    """What a build did; `str()` gives the summary line, e.g. `latents: 3 encoded, 5 reused`."""

    kind: str
    encoded: int
    reused: int
    seconds: float = 0.0

    @property
    def items_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return f"{self.kind}: {self.encoded} encoded, {self.reused} reused"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def shard_is_valid(path: Path, record: dict, check_hash: bool = True) -> bool:
    """True when the shard file exists with the recorded size (and sha256)."""
    try:
        if path.stat().st_size != record["bytes"]:
            return False
    except OSError:
        return False
    return not check_hash or _sha256(path) == record["sha256"]


def read_index(cache_dir: Path) -> dict:
    """The folder's index ({} when there is none yet)."""
    path = Path(cache_dir) / INDEX
    if not path.exists():
        return {}
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        log.warning("%s is unreadable (%s); its shards are checked again from their records", path, err)
        return {}
    return index if index.get("format") == FORMAT else {}


def scan_shards(cache_dir: Path, known: dict[str, dict] | None = None) -> tuple[dict[str, dict], list[str]]:
    """Valid shard records by name, from the index and from records left by unfinished builds.

    Shards in `known` were checked already and are taken as they are; the others are checked by
    size and sha256. Returns (valid records, names of damaged or missing shards).
    """
    cache_dir = Path(cache_dir)
    known = known or {}
    candidates = dict(read_index(cache_dir).get("shards", {}))
    if cache_dir.exists():
        for path in sorted(cache_dir.glob(f"*.safetensors{RECORD_SUFFIX}")):
            if path.name.startswith("."):
                continue
            try:
                candidates.setdefault(path.name[: -len(RECORD_SUFFIX)], json.loads(path.read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError):
                candidates.setdefault(path.name[: -len(RECORD_SUFFIX)], {"bytes": -1, "sha256": "", "entries": {}})
    valid, invalid = {}, []
    for name, record in candidates.items():
        if name in known:
            valid[name] = known[name]
        elif shard_is_valid(cache_dir / name, record):
            valid[name] = record
        else:
            log.warning("cache shard %s is missing or damaged; its %d entries will be rebuilt",
                        cache_dir / name, len(record.get("entries", {})))
            invalid.append(name)
    return valid, invalid


def write_index(cache_dir: Path, records: dict[str, dict], invalid: Iterable[str] = (), **extra) -> None:
    """Write the index (last step of a build), then drop the per-shard records it now holds and damaged shards."""
    cache_dir = Path(cache_dir)
    index = {"format": FORMAT, **extra, "shards": dict(sorted(records.items()))}
    write_text_atomic(cache_dir / INDEX, json.dumps(index, indent=1))
    for name in records:
        (cache_dir / f"{name}{RECORD_SUFFIX}").unlink(missing_ok=True)
    for name in invalid:
        # Our own cache files, never a user's: a damaged shard is useless and would be re-checked forever.
        (cache_dir / name).unlink(missing_ok=True)
        (cache_dir / f"{name}{RECORD_SUFFIX}").unlink(missing_ok=True)


class ShardWriter:
    """Collects entries and writes a shard (plus its record) every `shard_size` entries."""

    def __init__(self, cache_dir: Path, prefix: str, shard_size: int = 256):
        self.cache_dir, self.prefix, self.shard_size = Path(cache_dir), prefix, max(1, shard_size)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.written = 0

    @staticmethod
    def new_prefix(kind: str, rank: int) -> str:
        """Unique per build and process, so shards of earlier or parallel builds are never overwritten."""
        return f"{kind}-{time.time_ns():x}{os.getpid():x}-r{rank}"

    def add(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        # Copies to CPU now so the GPU batch can be freed; contiguous because safetensors needs it.
        self.pending[key] = {f: t.detach().to("cpu").contiguous() for f, t in tensors.items()}
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"{self.prefix}-{self.written:05d}.safetensors"
        path = self.cache_dir / name
        flat = {f"{key}/{field}": t for key, fields in self.pending.items() for field, t in fields.items()}
        try:
            with atomic_file(path) as tmp:
                save_file(flat, str(tmp))
            record = {"bytes": path.stat().st_size, "sha256": _sha256(path),
                      "entries": {key: sorted(fields) for key, fields in self.pending.items()}}
            write_text_atomic(self.cache_dir / f"{name}{RECORD_SUFFIX}", json.dumps(record))
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            path.unlink(missing_ok=True)  # a shard without its record would only be checked and dropped
            free = shutil.disk_usage(self.cache_dir).free / 2**30
            raise CacheError(f"{self.cache_dir}: disk full while writing the cache ({free:.2f} GiB free). The "
                             f"{self.written} shard(s) already written are kept and reused: free some space, or "
                             "set cache.dir to another disk, and run again") from None
        self.pending = {}
        self.written += 1


class ShardReader:
    """key -> {field: tensor} over the shards of an index, read lazily through memory-mapped `safe_open`."""

    def __init__(self, cache_dir: Path, in_memory: bool = False, verify: bool = True):
        self.cache_dir = Path(cache_dir)
        self.index = read_index(self.cache_dir)
        if not self.index:
            raise CacheError(f"{self.cache_dir}: no cache index here; build it with `finetune cache CONFIG`")
        self.locations: dict[str, tuple[str, list[str]]] = {}
        for name, record in self.index["shards"].items():
            if not shard_is_valid(self.cache_dir / name, record, check_hash=verify):
                raise CacheError(f"{self.cache_dir / name}: cache shard is missing or damaged; "
                                 "run `finetune cache CONFIG` again to rebuild its entries")
            for key, fields in record["entries"].items():
                self.locations[key] = (name, fields)
        self._handles: dict[str, object] = {}
        self._memory: dict[str, dict[str, torch.Tensor]] | None = None
        if in_memory:
            self._memory = {}
            for name in self.index["shards"]:
                self._memory[name] = load_file(str(self.cache_dir / name))

    def __contains__(self, key: str) -> bool:
        return key in self.locations

    def __len__(self) -> int:
        return len(self.locations)

    def get(self, key: str) -> dict[str, torch.Tensor]:
        try:
            name, fields = self.locations[key]
        except KeyError:
            raise CacheError(f"{self.cache_dir}: no entry {key[:12]}… (the cache was built for other data "
                             "or settings); run `finetune cache CONFIG` again") from None
        if self._memory is not None:
            shard = self._memory[name]
            return {field: shard[f"{key}/{field}"] for field in fields}
        handle = self._handles.get(name)
        if handle is None:
            handle = self._handles[name] = safe_open(str(self.cache_dir / name), framework="pt")
        return {field: handle.get_tensor(f"{key}/{field}") for field in fields}

    def __getstate__(self) -> dict:
        # DataLoader workers pickle the reader; open file handles don't travel, each worker reopens.
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
