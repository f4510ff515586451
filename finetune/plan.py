"""The run's plan, torch-free: batches per bucket, optimizer steps per epoch and in all, and the images never trained.

`run_plan` counts exactly what `bucketing.sampler.BucketBatchSampler` yields (the same grouping by bucket and batch
size, the same draw counts, `bucket_steps` for the cut), so `finetune dataset inspect`, `finetune train --dry-run`
and a training start print one plan, and the loop runs it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from bucketing.sampler import BucketBatchSampler, bucket_steps


def split_rows(fingerprints: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train rows, validation rows): an image (both flip variants) lands on one side, by hash, stably."""
    if fraction <= 0:
        return list(range(len(fingerprints))), []
    train, val = [], []
    for i, fingerprint in enumerate(fingerprints):
        digest = hashlib.sha256(f"{seed}:{fingerprint}".encode()).digest()
        (val if int.from_bytes(digest[:4], "little") / 2**32 < fraction else train).append(i)
    if not train:  # a tiny dataset: never hold out everything
        train, val = val[:1], val[1:]
    return train, val


def subset_sampling(subset_of_row: list[str], dataset_cfg, batch_size: int
                    ) -> tuple[list[int], list[int] | None, dict[int, float] | None]:
    """Per row: its subset's batch size (default `batch_size`); with subset probabilities, the row's
    subset index and each subset's weight, for the sampler's per-epoch draw counts."""
    index = {subset.subset_name: i for i, subset in enumerate(dataset_cfg.subsets)}
    subsets = dataset_cfg.subsets
    sizes = [subsets[index[name]].batch_size or batch_size for name in subset_of_row]
    if all(subset.probability is None for subset in subsets):
        return sizes, None, None
    return sizes, [index[name] for name in subset_of_row], {i: s.probability for i, s in enumerate(subsets)}


def epoch_steps(batches_per_epoch: int, accumulation: int) -> int:
    """Optimizer steps in one epoch: an accumulation window never crosses the epoch's end, the last one is shorter."""
    return math.ceil(batches_per_epoch / accumulation)


@dataclass(frozen=True)
class BucketBatches:
    """One (bucket, batch size) group of an epoch, as the sampler cuts it."""

    bucket: tuple[int, int]  # (height, width) px
    batch_size: int
    images: int  # distinct images (a flipped twin is the same image)
    draws: int  # rows drawn in an epoch (repeats and subset shares included)
    batches: int  # per process
    left_out: int  # rows of the last partial step that remainder = "drop" leaves out each epoch


@dataclass(frozen=True)
class RunPlan:
    buckets: list[BucketBatches]
    num_processes: int
    accumulation: int
    remainder: str
    max_steps: int | None  # None: max_epochs decides
    max_epochs: int | None
    held_out: int = 0  # images held out for validation
    validation_split: float = 0.0
    shares_vary: bool = False  # subset probabilities: the draws (and batches) change a little from epoch to epoch

    @property
    def batches_per_epoch(self) -> int:
        """Batches per epoch per process: `len(loader)`."""
        return sum(group.batches for group in self.buckets)

    @property
    def steps_per_epoch(self) -> int:
        return epoch_steps(self.batches_per_epoch, self.accumulation)

    @property
    def total_steps(self) -> int:
        if self.max_epochs is None:
            return self.max_steps
        return max(1, self.max_epochs * self.steps_per_epoch)

    def lines(self) -> list[str]:
        """The plan as printed: the totals, then one line per bucket."""
        n = self.num_processes
        processes = f" on each of {n} processes" if n > 1 else ""
        epochs = (f"{self.max_epochs} epochs (training.max_epochs)" if self.max_epochs is not None else
                  f"{self.total_steps / max(self.steps_per_epoch, 1):.2f} epochs (training.max_steps)")
        out = [f"plan: {self.batches_per_epoch} batches per epoch{processes}, accumulation {self.accumulation}: "
               f"{self.steps_per_epoch} optimizer steps per epoch (the last window of an epoch steps with the "
               f"batches it has), {self.total_steps} steps in all = {epochs}"]
        if self.shares_vary:
            out.append("  (subset probabilities: each epoch draws anew, so its batch count may differ by a few)")
        for g in self.buckets:
            dropped = f", {g.left_out} left out each epoch (a different {g.left_out} each time)" if (
                g.left_out and g.left_out < g.draws) else ""
            out.append(f"  bucket {g.bucket[0]}x{g.bucket[1]}, batch {g.batch_size}: {g.images} images, {g.draws} "
                       f"draws per epoch, {g.batches} batches{dropped}")
        return out

    def warnings(self) -> list[str]:
        """The images never trained, and why; an epoch with no batch at all."""
        out = []
        for g in self.buckets:
            if g.batches == 0:
                step = g.batch_size * self.num_processes
                out.append(f"bucket {g.bucket[0]}x{g.bucket[1]}: its {g.images} images are never trained: {g.draws} "
                           f"draws per epoch, fewer than one step's {step} (batch {g.batch_size} x {self.num_processes} "
                           "processes), and dataset.remainder = \"drop\" drops them; set dataset.remainder = \"carry\""
                           " or a smaller batch size, or add images of this shape")
        if self.held_out:
            out.append(f"{self.held_out} images are held out for the validation loss (validation.split = "
                       f"{self.validation_split}) and never trained")
        if self.buckets and self.batches_per_epoch == 0:
            out.append("no batch at all in an epoch: nothing would train; set dataset.remainder = \"carry\"")
        return out

    def text(self) -> str:
        return "\n".join(self.lines() + [f"warning: {w}" for w in self.warnings()])


def run_plan(manifest, dataset_cfg, training, validation_split: float = 0.0, num_processes: int = 1) -> RunPlan:
    """The plan of a run over `manifest` (every row: validation rows are held out here, as training holds them).

    Args:
        manifest: a table with the columns fingerprint, path, bucket, repeats and subset (the manifest).
        dataset_cfg, training: the config's [dataset] and [training] tables.
    """
    train_rows, val_rows = split_rows(list(manifest["fingerprint"]), validation_split, training.seed)
    all_paths = list(manifest["path"])
    held_out = len({all_paths[i] for i in val_rows})  # images, not flip variants

    def pick(column: str) -> list:  # the training rows of one column
        values = list(manifest[column])
        return [values[i] for i in train_rows]

    buckets, paths = [tuple(b) for b in pick("bucket")], pick("path")
    sizes, groups, weights = subset_sampling(pick("subset"), dataset_cfg, training.batch_size)
    # The sampler's own draw counts (subset shares included), for the first epoch; no batch is cut.
    sampler = BucketBatchSampler(buckets, batch_size=training.batch_size, seed=training.seed, repeats=pick("repeats"),
                                 num_replicas=num_processes, remainder=dataset_cfg.remainder, batch_sizes=sizes,
                                 groups=groups, group_weights=weights)
    draws: dict[tuple, int] = {}
    images: dict[tuple, set] = {}
    for row, count in enumerate(sampler.epoch_counts(0)):
        key = (buckets[row], sizes[row])
        draws[key] = draws.get(key, 0) + count
        images.setdefault(key, set()).add(paths[row])
    plan = []
    for key in sorted(draws):  # sorted as the sampler groups them
        batches, left_out = bucket_steps(draws[key], key[1], num_processes, dataset_cfg.remainder)
        plan.append(BucketBatches(key[0], key[1], len(images[key]), draws[key], batches, left_out))
    max_steps = training.max_steps if training.max_epochs is None else None
    return RunPlan(plan, num_processes, training.gradient_accumulation_steps, dataset_cfg.remainder, max_steps,
                   training.max_epochs,
                   held_out=held_out, validation_split=validation_split, shares_vary=weights is not None)
