"""Batches of one bucket each, shuffled by (seed, epoch), split across processes, resumable mid-epoch."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

Step = list[list[int]]  # one batch of row indices per process, all from the same bucket


class BucketBatchSampler:
    """Yields lists of row indices; every batch holds rows of a single bucket (one tensor shape).

    An epoch is planned as a list of steps, the same on every process (it depends only on the seed,
    the epoch and the rows):

    1. Each row appears `repeats[row]` times. The copies are laid out in rounds (every row once,
       then the rows repeated at least twice, ...), each round shuffled, so copies of one image
       rarely share a batch.
    2. A bucket's rows are cut into steps of `batch_size × num_replicas` rows; in a step, process
       `rank` takes the `rank`-th slice of `batch_size` rows. So at every step all processes hold
       batches of the same shape, and no row is given to two processes.
    3. A bucket's last partial step (r rows, fewer than batch_size × num_replicas):
       - `remainder="drop"`: dropped this epoch (a later epoch's shuffle drops other rows);
       - `remainder="carry"`: kept, cut into `num_replicas` smaller batches whose sizes differ by at
         most one. With fewer rows than processes (r < num_replicas), the bucket's first rows are
         repeated to give every process one row, as torch's DistributedSampler pads. With one
         process this is simply "the partial batch is yielded as a smaller batch", and every row
         is seen exactly once (per repeat) per epoch.
    4. The steps of all buckets are shuffled together.

    `random.Random(f"{seed}:{epoch}")` drives all of it: the same seed gives the same batches,
    another epoch a different order. Every process gets the same number of batches (DDP needs that).
    """

    def __init__(self, buckets: Sequence[tuple[int, int]], batch_size: int, seed: int,
                 repeats: Sequence[int] | None = None, num_replicas: int = 1, rank: int = 0,
                 remainder: str = "carry"):
        if remainder not in ("drop", "carry"):
            raise ValueError(f"remainder must be 'drop' or 'carry', got {remainder!r}")
        if batch_size < 1 or num_replicas < 1:
            raise ValueError(f"batch_size ({batch_size}) and num_replicas ({num_replicas}) must be at least 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.buckets = [tuple(b) for b in buckets]
        self.repeats = [int(r) for r in repeats] if repeats is not None else [1] * len(self.buckets)
        if len(self.repeats) != len(self.buckets) or min(self.repeats, default=0) < 0:
            raise ValueError(f"repeats: need one count >= 0 per row ({len(self.buckets)} rows), "
                             f"got {len(self.repeats)} counts")
        self.batch_size, self.seed = batch_size, seed
        self.num_replicas, self.rank, self.remainder = num_replicas, rank, remainder
        self.epoch = 0
        self.batch_index = 0  # batches of this epoch already yielded to this process
        self._planned: tuple[int, list[Step]] | None = None  # (epoch, steps): __len__ and __iter__ share it

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch` (from its first batch); setting the current epoch again keeps the position."""
        if epoch != self.epoch:
            self.epoch, self.batch_index = epoch, 0

    def epoch_steps(self, epoch: int) -> list[Step]:
        """The steps of `epoch` for all processes: step[k][rank] is process rank's k-th batch."""
        if self._planned is None or self._planned[0] != epoch:
            self._planned = (epoch, self._plan(epoch))
        return self._planned[1]

    def _plan(self, epoch: int) -> list[Step]:
        rng = random.Random(f"{self.seed}:{epoch}")
        groups: dict[tuple[int, int], list[int]] = {}
        for row, bucket in enumerate(self.buckets):
            groups.setdefault(bucket, []).append(row)
        steps: list[Step] = []
        for bucket in sorted(groups):  # sorted: dict order must not depend on row order alone
            steps.extend(self._cut(self._in_rounds(groups[bucket], rng)))
        rng.shuffle(steps)
        return steps

    def _in_rounds(self, rows: list[int], rng: random.Random) -> list[int]:
        """Each row `repeats` times: round k holds the rows repeated more than k times, shuffled."""
        out: list[int] = []
        for round_ in range(max((self.repeats[r] for r in rows), default=0)):
            members = [r for r in rows if self.repeats[r] > round_]
            rng.shuffle(members)
            out.extend(members)
        return out

    def _cut(self, rows: list[int]) -> list[Step]:
        """Steps of one bucket: full ones, then the remainder as the docstring says."""
        n, size = self.num_replicas, self.batch_size
        full = len(rows) // (size * n)
        steps = [[rows[(k * n + p) * size:(k * n + p + 1) * size] for p in range(n)] for k in range(full)]
        rest = rows[full * size * n:]
        if rest and self.remainder == "carry":
            if len(rest) < n:
                rest = rest + [rows[i % len(rows)] for i in range(n - len(rest))]
            base, extra = divmod(len(rest), n)
            bounds = [p * base + min(p, extra) for p in range(n + 1)]
            steps.append([rest[bounds[p]:bounds[p + 1]] for p in range(n)])
        return steps

    def __iter__(self) -> Iterator[list[int]]:
        steps = self.epoch_steps(self.epoch)
        while self.batch_index < len(steps):
            batch = steps[self.batch_index][self.rank]
            self.batch_index += 1
            yield batch

    def __len__(self) -> int:
        """Batches per epoch for this process (the same on every process)."""
        return len(self.epoch_steps(self.epoch))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_index": self.batch_index}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state["batch_index"]` of `state["epoch"]`: the next batch is the one a run that
        never stopped would have taken next."""
        epoch, index = int(state["epoch"]), int(state["batch_index"])
        if epoch < 0 or index < 0:
            raise ValueError(f"sampler state: epoch ({epoch}) and batch_index ({index}) must be >= 0")
        self.epoch, self.batch_index = epoch, index
