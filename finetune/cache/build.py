"""The build loop both caches share: find what is missing, split it across processes, encode, index."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from finetune.cache.store import CacheStats, ShardWriter, scan_shards, write_index
from finetune.errors import ConfigError

# encode(keys) yields (key, {field: tensor}) for every key it is given, in any order.
Encoder = Callable[[list[str]], Iterator[tuple[str, dict[str, torch.Tensor]]]]

STORE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def store_dtype(name: str) -> torch.dtype:
    if name not in STORE_DTYPES:
        raise ConfigError(f"cache.dtype = {name!r}: must be one of {', '.join(STORE_DTYPES)}")
    return STORE_DTYPES[name]


def _rank_world(accelerator) -> tuple[int, int]:
    if accelerator is None:
        return 0, 1
    return accelerator.process_index, accelerator.num_processes


def _wait(accelerator) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


def run_build(kind: str, cache_dir: Path, wanted: Iterable[str], encode: Encoder, *, accelerator=None,
              shard_size: int = 256, progress: bool = True, unit: str = "it", index_extra: dict | None = None
              ) -> CacheStats:
    """Encode the wanted keys the cache lacks; every process takes a disjoint share (rank::world).

    Each process writes its own shards as they fill; the main process writes the index once all
    are done, so a reader never sees a half-built cache.
    """
    start = time.perf_counter()
    cache_dir = Path(cache_dir)
    rank, world = _rank_world(accelerator)
    wanted = list(dict.fromkeys(wanted))
    # Every process reads the same files, so all agree on what is missing and on the split.
    records, invalid = scan_shards(cache_dir)
    available = {key for record in records.values() for key in record["entries"]}
    missing = sorted(key for key in wanted if key not in available)
    mine = missing[rank::world]
    # No process writes before all have scanned: a shard appearing mid-scan would split the work unevenly.
    _wait(accelerator)

    writer = ShardWriter(cache_dir, ShardWriter.new_prefix(kind, rank), shard_size)
    # No bar when everything is cached already: "caching latents: 0img" says nothing.
    with tqdm(total=len(mine), desc=f"caching {kind}", unit=unit, disable=not progress or rank != 0 or not mine,
              dynamic_ncols=True) as bar:
        for key, tensors in encode(mine):
            writer.add(key, tensors)
            bar.update(1)
    writer.flush()

    _wait(accelerator)  # all shards of all processes are on disk
    if rank == 0:
        final, more_invalid = scan_shards(cache_dir, known=records)
        write_index(cache_dir, final, [*invalid, *more_invalid], kind=kind, **(index_extra or {}))
    _wait(accelerator)  # the index is written before anyone opens the cache
    return CacheStats(kind, encoded=len(missing), reused=len(wanted) - len(missing),
                      seconds=time.perf_counter() - start)
