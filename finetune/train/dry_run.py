"""`finetune train --dry-run`: the checks a run makes before its slow parts, in the same order, then its plan.

Config (loaded by the caller) -> model kind and input channels from its config.json or single-file header
(no weights) -> dataset scan (in memory, working files in a removed temporary folder) -> output folder ->
with `--resume`, the checkpoint's compatibility (process count, frozen settings, data) -> the plan, the
effective config and the memory estimate. Nothing is written: not the manifest, not the run folder.
"""

from __future__ import annotations

import os

from finetune.config import TrainConfig, check_output_dir, dump_config
from finetune.dataset import format_scan, scan_dataset
from finetune.memory.profiles import apply_memory_profile
from finetune.models.load import check_unet_inputs, model_kind
from finetune.plan import run_plan
from finetune.train import checkpoint as ckpt
from finetune.train.builders import length_in_steps
from finetune.train.estimate import config_peak_gib
from finetune.train.refiner import refiner_run_config
from finetune.train.resume import (check_config, check_dataset, check_process_count, finished, resume_point,
                                   training_rows_hash, with_checkpoint_profile)

DEFAULT_GPU_GIB = 24.0  # the card planned for on a machine without a GPU


def local_gpu_gib() -> float:
    """The local GPU's total memory in GiB, or `DEFAULT_GPU_GIB` without one."""
    import torch  # the CLI's train command imports it anyway; here only to read the card's size

    if not torch.cuda.is_available():
        return DEFAULT_GPU_GIB
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def dry_run(cfg: TrainConfig, resume: str | None = None, allow_changes: bool = False,
            gpu_gib: float | None = None) -> tuple[str, bool]:
    """Check and plan the run `cfg` (and `resume`) as `train()` would, on a card of `gpu_gib` (default: the local one).

    Returns:
        (the report, whether the run finished already: a resume would do nothing)

    Raises:
        FinetuneError: the first check that fails, with the message the real run gives.
    """
    gpu_gib = local_gpu_gib() if gpu_gib is None else gpu_gib
    num_processes = int(os.environ.get("WORLD_SIZE", "1"))  # the launcher's, as the run reads it
    kind = model_kind(cfg.model)
    check_unet_inputs(cfg.model)
    scanned = scan_dataset(cfg.dataset, cfg.training.seed)
    out = [f"model: {cfg.model.pretrained} ({kind}; input channels checked, no weights read)", format_scan(scanned)]
    check_output_dir(cfg.output, cfg.dataset)
    point = resume_point(cfg.output.checkpoints_dir, resume) if resume else None
    if point is None:
        ckpt.check_fresh_start(cfg.output.checkpoints_dir)
    elif finished(point, cfg.training, cfg.output.adapter_path):
        return "\n".join(out + [f"finished already: step {point.state.step} ({point.folder}) is the run's last"]), True
    # The effective config, resolved as setup resolves it: the memory profile for this card, the refiner's timesteps.
    resolved, profile_line = apply_memory_profile(with_checkpoint_profile(cfg, point) if point else cfg,
                                                  free_gib=gpu_gib, num_processes=num_processes)
    resolved, refiner_line = refiner_run_config(resolved, kind)
    out += [line for line in (profile_line, refiner_line) if line]
    if point is not None:
        check_process_count(point, num_processes)
        changes = check_config(point, resolved, allow_changes)
        rows_hash = training_rows_hash(scanned.dataset, resolved.validation.split, resolved.training.seed)
        changes += check_dataset(point, rows_hash, resolved.output.name, allow_changes)
        out.append(f"resume: {point.folder} (step {point.state.step}) can be continued"
                   + "".join(f"\n  accepted with --allow-changes: {change}" for change in changes))
    plan = run_plan(scanned.dataset, resolved.dataset, resolved.training, resolved.validation.split, num_processes)
    resolved = length_in_steps(resolved, plan.batches_per_epoch, say=out.append)
    out += [plan.text(), "effective config (config.resolved.toml as the run would write it):",
            dump_config(resolved).rstrip(), _memory_line(resolved, gpu_gib),
            "dry run: nothing was written; run the same command without --dry-run to train"]
    return "\n".join(out), False


def _memory_line(cfg: TrainConfig, gpu_gib: float) -> str:
    largest = cfg.dataset.largest_resolution
    try:
        gib = config_peak_gib(cfg, largest**2)
    except Exception as err:  # noqa: BLE001 - e.g. nf4 needs real tensors: say so, the other checks stand
        return f"no memory estimate for these settings: {err}"
    verdict = "fits" if gib <= gpu_gib else "does NOT fit: pick memory.profile = \"low_vram\" or a smaller batch"
    amount = f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.0f} MiB"
    return (f"estimated peak GPU memory: {amount} on a {gpu_gib:g} GiB GPU ({cfg.memory.profile} profile, "
            f"{largest}², batch {cfg.training.batch_size}): {verdict}")
