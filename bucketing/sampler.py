"""Batches of one bucket each, shuffled by (seed, epoch), split across processes, resumable mid-epoch."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence


class BucketBatchSampler:
    """Yields lists of row indices; every batch holds rows of a single bucket (one tensor shape).

    Per epoch: each row appears `repeats[row]` times; rows are shuffled within their bucket, cut
    into batches of `batch_size`, and the batches of all buckets are shuffled together, all by
    `random.Random(f"{seed}:{epoch}")`. A bucket's last partial batch is dropped
    (`remainder="drop"`) or kept as a smaller batch (`"carry"`). With `num_replicas` processes,
    process `rank` takes every `num_replicas`-th batch; batches that would give one process more
    than the others (fewer than `num_replicas`, different ones each epoch) wait for the next epoch's
    shuffle, so all processes step together and no process sees another's images.
    """

    def __init__(self, buckets: Sequence[tuple[int, int]], batch_size: int, seed: int,
                 repeats: Sequence[int] | None = None, num_replicas: int = 1, rank: int = 0,
                 remainder: str = "carry"):
        if remainder not in ("drop", "carry"):
            raise ValueError(f"remainder must be 'drop' or 'carry', got {remainder!r}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.buckets = [tuple(b) for b in buckets]
        self.batch_size, self.seed = batch_size, seed
        self.repeats = list(repeats) if repeats is not None else [1] * len(self.buckets)
        self.num_replicas, self.rank, self.remainder = num_replicas, rank, remainder
        self.epoch = 0
        self.batch_index = 0  # batches of this epoch already yielded to this process

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batch_index = epoch, 0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All processes' batches of `epoch`, in order (before splitting by rank)."""
        rng = random.Random(f"{self.seed}:{epoch}")
        groups: dict[tuple[int, int], list[int]] = {}
        for row, bucket in enumerate(self.buckets):
            groups.setdefault(bucket, []).extend([row] * self.repeats[row])
        batches = []
        for bucket in sorted(groups):
            rows = groups[bucket]
            rng.shuffle(rows)
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start:start + self.batch_size]
                if len(batch) == self.batch_size or self.remainder == "carry":
                    batches.append(batch)
        rng.shuffle(batches)
        usable = len(batches) - len(batches) % self.num_replicas
        return batches[:usable]

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.epoch_batches(self.epoch)[self.rank::self.num_replicas]
        while self.batch_index < len(mine):
            batch = mine[self.batch_index]
            self.batch_index += 1
            yield batch

    def __len__(self) -> int:
        return len(self.epoch_batches(self.epoch)) // self.num_replicas

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_index": self.batch_index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])
