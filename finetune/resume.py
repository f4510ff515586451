"""Resuming a run: which checkpoint `--resume` means, whether the config still fits it, what `auto` chose."""

from __future__ import annotations

import tomllib
from pathlib import Path

from finetune import checkpoint as ckpt
from finetune.config import TrainConfig, dump_config
from finetune.errors import CheckpointError


def find_resume_folder(root: Path, resume: str) -> Path | None:
    """The checkpoint folder `--resume` names: "latest" (None when there is none yet) or a path."""
    if resume == "latest":
        return ckpt.latest_checkpoint(root)
    folder = Path(resume)
    if not (folder / ckpt.STATE_FILE).is_file():
        raise CheckpointError(f"{folder}: not a complete checkpoint (no {ckpt.STATE_FILE}); use --resume for the latest")
    return folder


def check_fresh_start(root: Path) -> None:
    """A run started without --resume must not write over (and prune) an earlier run's checkpoints.

    Raises:
        CheckpointError: `root` holds a complete checkpoint; says how to continue or start over.
    """
    latest = ckpt.latest_checkpoint(root)
    if latest is not None:
        raise CheckpointError(
            f"{root}: holds the checkpoints of an earlier run (latest: {latest.name}); a new run would write "
            "over them. Continue that run with --resume, or start a new one in another output.dir (its "
            "cache.dir may point at this run's cache: entries are keyed by what made them, so they are reused)")


def check_resumable(folder: Path, cfg: TrainConfig, state: ckpt.TrainState) -> None:
    """Refuse a resume that could not continue exactly: the config, dataset or process count changed.

    Raises:
        CheckpointError: listing every difference and what to do.
    """
    saved_cfg = tomllib.loads((folder / ckpt.CONFIG_FILE).read_text(encoding="utf-8"))
    problems = ckpt.resume_conflicts(saved_cfg, tomllib.loads(dump_config(cfg)))
    saved = ckpt.TrainState.from_file(folder / ckpt.STATE_FILE)
    if saved.dataset_hash and saved.dataset_hash != state.dataset_hash:
        problems.append("dataset: the images, captions or crops changed since the checkpoint")
    if saved.num_processes != state.num_processes:
        problems.append(f"processes: {saved.num_processes} in the checkpoint, {state.num_processes} now")
    if problems:
        raise CheckpointError(
            f"{folder}: cannot resume, the config changed in ways that would make the result wrong:\n  "
            + "\n  ".join(problems)
            + "\nrestore those settings, or start a new run in another output.dir")


def profile_of_checkpoint(cfg: TrainConfig, resume: str) -> TrainConfig:
    """`auto` on resume keeps the profile the stopped run chose: free memory moves, the run must not."""
    folder = find_resume_folder(cfg.output.checkpoints_dir, resume)
    if folder is None:
        return cfg
    saved = tomllib.loads((folder / ckpt.CONFIG_FILE).read_text(encoding="utf-8"))
    chosen = saved.get("training", {}).get("memory_profile", "auto")
    if chosen == "auto":  # a checkpoint from before auto recorded its choice
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.training.memory_profile = chosen
    return cfg
