"""What a run prints before its first step: derived figures, the memory estimate, the tracker config."""

from __future__ import annotations

import math

from finetune.config import TrainConfig


def print_plan(acc, cfg: TrainConfig, batches: int, rows: int, params, unet) -> None:
    """Samples, batches, steps per epoch, effective batch, trained parameters, and the memory estimate."""
    from finetune.memory.profiles import estimate_run_gib, free_gpu_gib

    per_epoch = math.ceil(batches / cfg.training.gradient_accumulation_steps)
    trained = sum(p.numel() for p in params)
    estimate = estimate_run_gib(unet, params, cfg.training, cfg.memory, cfg.optimizer.name, cfg.dataset.resolution**2)
    free = free_gpu_gib()
    if free is not None:
        warning = f"  WARNING: more than the {free:.1f} GiB free on the GPU" if estimate > free else ""
        acc.print(f"estimated peak GPU memory: {estimate:.1f} GiB{warning}")
    acc.print(
        f"{rows} samples, {batches} batches per epoch per process, {per_epoch} optimizer steps per epoch; "
        f"effective batch {cfg.training.effective_batch_size * acc.num_processes} images; "
        f"{trained / 1e6:.2f} M trained parameters; {cfg.training.max_steps} steps"
    )
