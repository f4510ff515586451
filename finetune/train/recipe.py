"""The training recipe for SDXL: setup -> loop -> finish, LoRA or full fine-tuning, resumable."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.config import TrainConfig, dump_config
from finetune.errors import FinetuneError
from finetune.io import write_text_atomic

log = logging.getLogger("finetune")


@dataclass
class TrainResult:
    output_path: Path  # the final adapter (LoRA) or UNet (full) .safetensors
    step: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step on this process
    checkpoint: Path | None = None
    manifest_dir: Path | None = None
    log_dir: Path | None = None
    interrupted: bool = False


class StopFlag:
    """Ctrl-C / SIGTERM ask the loop to save and stop at the end of the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once; the last complete checkpoint stays
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested: saving a checkpoint after this step (Ctrl-C again to abort)")

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: TrainConfig, resume: str | None = None, progress: bool = True) -> TrainResult:
    """Run training as `cfg` says; `resume` is None, "latest" or a checkpoint folder."""
    from finetune.train.checkpoint import check_fresh_start
    from finetune.train.run import Run

    if resume is None:
        check_fresh_start(cfg.output.checkpoints_dir)  # before minutes of scanning and caching
    run = Run.setup(cfg, progress=progress, resume=resume)  # accelerator, manifest, models, caches, optimizer, loader
    start = run.resume(resume) if resume else None
    try:
        with StopFlag() as stop:
            interrupted = _loop(run, stop)
    except torch.OutOfMemoryError:
        raise FinetuneError(
            "out of GPU memory: lower training.batch_size, set training.gradient_checkpointing = true, "
            "training.base_dtype = 'bf16', optimizer.name = 'adamw8bit', or memory_profile = 'low_vram'"
        ) from None
    return run.finish(interrupted=interrupted, resumed_from=start)


def _loop(run, stop: StopFlag) -> bool:
    """Optimizer steps until max_steps (or a stop request). Returns True if stopped early."""
    cfg, state, accelerator = run.cfg, run.state, run.accelerator
    bar = run.progress_bar()
    nan_in_a_row = 0
    while state.step < cfg.training.max_steps:
        run.start_epoch()
        for batch in run.loader:
            state.batch_in_epoch += 1
            with accelerator.accumulate(*run.trained_models):
                loss = run.micro_step(batch)
            if not accelerator.sync_gradients:
                continue
            if loss is None:  # non-finite on some process: the step was skipped
                nan_in_a_row += 1
                state.nan_steps_skipped += 1
                if nan_in_a_row >= cfg.training.max_nan_steps:
                    raise FinetuneError(
                        f"loss was NaN/inf {nan_in_a_row} steps in a row at step {state.step}; stopped. "
                        f"The last good checkpoint is in {cfg.output.checkpoints_dir}: lower "
                        "training.learning_rate or use training.mixed_precision = 'bf16' and resume"
                    )
                continue
            nan_in_a_row = 0
            state.step += 1
            run.after_step(loss, bar)
            if state.step >= cfg.training.max_steps or stop.requested:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
        if stop.requested:
            run.save_checkpoint()
            return True
    return False


def write_resolved_config(cfg: TrainConfig) -> Path:
    """The config as the run saw it (defaults filled, paths absolute), beside the outputs."""
    path = cfg.output.dir / "config.resolved.toml"
    write_text_atomic(path, dump_config(cfg))
    return path
