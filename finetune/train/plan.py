"""What a run prints before its first step: derived figures, the memory estimate, the tracker config."""

from __future__ import annotations

from collections import Counter

from bucketing.manifest import load_manifest
from finetune.config import TrainConfig
from finetune.memory.profiles import estimate_run_gib, free_gpu_gib
from finetune.plan import RunPlan, run_plan


def print_plan(acc, cfg: TrainConfig, batches: int, rows: int, params, unet, sampler=None, manifest=None) -> None:
    """The memory estimate, samples, effective batch, trained parameters, then the run's plan (`finetune.plan`, as
    `dataset inspect` and `--dry-run` print it) and its warnings; with `sampler` and `manifest`, one line per subset
    when subsets mix budgets, batch sizes or shares."""
    trained = sum(p.numel() for p in params)
    largest = cfg.dataset.largest_resolution
    estimate = estimate_run_gib(unet, params, cfg.training, cfg.memory, cfg.optimizer.name, largest**2)
    free = free_gpu_gib()
    if free is not None:
        warning = f"  WARNING: more than the {free:.1f} GiB free on the GPU" if estimate > free else ""
        acc.print(f"estimated peak GPU memory: {estimate:.1f} GiB{warning}")
    acc.print(f"{rows} samples; effective batch {cfg.training.effective_batch_size * acc.num_processes} images; "
              f"{trained / 1e6:.2f} M trained parameters; {cfg.training.max_steps} steps")
    acc.print(the_plan(cfg, acc.num_processes).text())
    if sampler is not None and manifest is not None:
        for line in subset_lines(cfg, sampler, manifest, acc.num_processes):
            acc.print(line)


def subset_lines(cfg: TrainConfig, sampler, manifest, num_processes: int = 1) -> list[str]:
    """Per subset: budgets, effective batch and images drawn per epoch (when any of it is per subset)."""
    subsets = cfg.dataset.subsets
    mixed = any(s.resolution is not None or s.batch_size or s.probability or s.loss_weight is not None
                for s in subsets)
    if not mixed:
        return []
    counts = sampler.epoch_counts(sampler.epoch)
    drawn = Counter()
    for name, count in zip(manifest["subset"], counts):
        drawn[name] += count
    lines = []
    for s in subsets:
        batch = (s.batch_size or cfg.training.batch_size) * cfg.training.gradient_accumulation_steps * num_processes
        budgets = "/".join(str(r) for r in s.resolutions or [cfg.dataset.resolution])
        weight = f", loss weight {s.loss_weight}" if s.loss_weight is not None else ""
        share = f", probability {s.probability}" if s.probability is not None else ""
        lines.append(f"  subset {s.subset_name}: resolution {budgets}, effective batch {batch}, "
                     f"{drawn[s.subset_name]} images per epoch{share}{weight}")
    return lines


def the_plan(cfg: TrainConfig, num_processes: int) -> RunPlan:
    """The run's plan from its manifest on disk (every row: the validation hold-out is part of the plan)."""
    return run_plan(load_manifest(cfg.output.manifest_dir), cfg.dataset, cfg.training, cfg.validation.split,
                    num_processes)
