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

    Mixing subsets:
    - `batch_sizes` (one per row) replaces `batch_size` row by row: rows are grouped by (bucket,
      batch size), so a 512² subset can take bigger batches than a 1024² one; a batch is still one shape.
    - `groups` (a subset id per row) with `group_weights` (id -> weight) fixes each subset's share of
      an epoch: the epoch keeps its length (the sum of repeats) and subset g gets round(length × w_g/Σw)
      draws (largest remainders). A subset draws whole passes over its rows (with repeats) and then a
      seeded sample of one more pass, so a small subject folder is seen many times and a big style
      folder partly, other rows each epoch.

    `random.Random(f"{seed}:{epoch}")` drives all of it: the same seed gives the same batches,
    another epoch a different order. Every process gets the same number of batches (DDP needs that).
    """

    def __init__(self, buckets: Sequence[tuple[int, int]], batch_size: int, seed: int,
                 repeats: Sequence[int] | None = None, num_replicas: int = 1, rank: int = 0,
                 remainder: str = "carry", batch_sizes: Sequence[int] | None = None,
                 groups: Sequence[int] | None = None, group_weights: dict[int, float] | None = None):
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
        self.batch_sizes = [int(b) for b in batch_sizes] if batch_sizes is not None else [batch_size] * len(self.buckets)
        if len(self.batch_sizes) != len(self.buckets) or min(self.batch_sizes, default=1) < 1:
            raise ValueError(f"batch_sizes: need one size >= 1 per row ({len(self.buckets)} rows)")
        self.groups = [int(g) for g in groups] if groups is not None else None
        self.group_weights = dict(group_weights) if group_weights else None
        if self.group_weights is not None:
            if self.groups is None or len(self.groups) != len(self.buckets):
                raise ValueError(f"group_weights need one group id per row ({len(self.buckets)} rows)")
            missing = sorted(set(self.groups) - set(self.group_weights))
            if missing or min(self.group_weights.values()) <= 0:
                raise ValueError(f"group_weights: need a weight > 0 for every group (missing: {missing})")
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
        counts = self.epoch_counts(epoch)
        groups: dict[tuple, list[int]] = {}
        for row, bucket in enumerate(self.buckets):
            groups.setdefault((bucket, self.batch_sizes[row]), []).append(row)
        steps: list[Step] = []
        for key in sorted(groups):  # sorted: dict order must not depend on row order alone
            steps.extend(self._cut(self._in_rounds(groups[key], rng, counts), key[1]))
        rng.shuffle(steps)
        return steps

    def epoch_counts(self, epoch: int) -> list[int]:
        """How often each row is drawn in `epoch`: its repeats, or its share of its group's draws."""
        if self.group_weights is None:
            return self.repeats
        rng = random.Random(f"{self.seed}:{epoch}:draws")  # its own stream: the batch order's is untouched
        members: dict[int, list[int]] = {}
        for row, group in enumerate(self.groups):
            members.setdefault(group, []).append(row)
        ids = sorted(members)
        draws = draw_counts(sum(self.repeats), [self.group_weights[g] for g in ids])
        counts = [0] * len(self.buckets)
        for group, wanted in zip(ids, draws):
            pool = [r for r in members[group] for _ in range(self.repeats[r])]  # one pass, repeats included
            if not pool:
                continue
            passes, extra = divmod(wanted, len(pool))
            for row in pool:
                counts[row] += passes
            for row in rng.sample(pool, extra):
                counts[row] += 1
        return counts

    def _in_rounds(self, rows: list[int], rng: random.Random, counts: Sequence[int]) -> list[int]:
        """Each row `counts[row]` times: round k holds the rows drawn more than k times, shuffled."""
        out: list[int] = []
        for round_ in range(max((counts[r] for r in rows), default=0)):
            members = [r for r in rows if counts[r] > round_]
            rng.shuffle(members)
            out.extend(members)
        return out

    def _cut(self, rows: list[int], size: int) -> list[Step]:
        """Steps of one bucket: full ones, then the remainder as the docstring says."""
        n = self.num_replicas
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

    def rows_in_step(self, index: int) -> tuple[int, int]:
        """(offset, total) of this process's batch `index` of the current epoch: all processes together
        train on `total` rows in that step, and this process's come after the first `offset`."""
        step = self.epoch_steps(self.epoch)[index]
        return sum(len(batch) for batch in step[:self.rank]), sum(len(batch) for batch in step)

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


def draw_counts(total: int, weights: Sequence[float]) -> list[int]:
    """`total` draws split by `weights` (largest remainders, ties to the earlier): the counts sum to `total`."""
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def bucket_steps(draws: int, batch_size: int, num_replicas: int = 1, remainder: str = "carry") -> tuple[int, int]:
    """(steps, rows left out) of one (bucket, batch size) group with `draws` rows in an epoch, as `_cut` cuts it:
    full steps of `batch_size × num_replicas` rows, and the last partial step kept ("carry") or dropped ("drop")."""
    full, rest = divmod(draws, batch_size * num_replicas)
    if rest and remainder == "carry":
        return full + 1, 0
    return full, rest
