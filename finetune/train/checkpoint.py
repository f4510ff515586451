"""Checkpoints and resume: `checkpoints/step-NNNNNN/` written whole or not at all, `latest` last; loading one
back into a prepared run (`finetune.train.resume` decides which, and whether the config still fits).

A checkpoint holds the training state (trained weights `trainable_N.safetensors`; optimizer, LR
scheduler, grad scaler, EMA and new words in `training_state.safetensors` + `.json`; each process's RNG
in `rng_N.safetensors` + `.json`; see `state_io`), `train_state.json` (the one resume object), the
resolved config and a usable adapter/model `.safetensors`. No pickle: loading it runs no code (FSDP
runs excepted: their shards go through Accelerate and torch.distributed.checkpoint). `files.json`
lists every file with size and sha256 (see `checkpoint_files`); resume verifies it and falls back to
the newest intact checkpoint. It is written into a hidden temp folder and renamed; a folder without
`train_state.json` (killed mid-save) is never resumed from.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetune.errors import CheckpointError
from finetune.io import fsync_tree, write_text_atomic
from finetune.train import checkpoint_files, state_io

STEP_DIR = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "train_state.json"
CONFIG_FILE = "config.toml"


@dataclass
class TrainState:
    """Everything a resume needs beyond the Accelerate state."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # sampler position: batches of this epoch already consumed
    images_seen: int = 0  # all processes together
    num_processes: int = 1
    seed: int = 0
    nan_steps_skipped: int = 0
    dataset_hash: str = ""
    changed_on_resume: list[str] = field(default_factory=list)  # --allow-changes: the run is not reproducible

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_file(cls, path: Path) -> TrainState:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(**{key: value for key, value in data.items() if key in cls.__dataclass_fields__})


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first, as (step, folder)."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """The folder named by `latest` if it is complete, else the newest complete one (not verified:
    `resume_candidate` is the one resume uses)."""
    pointed = _pointed(root)
    if pointed is not None:
        return pointed
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def _pointed(root: Path) -> Path | None:
    pointer = root / "latest"
    try:
        candidate = root / pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return candidate if STEP_DIR.match(candidate.name) and (candidate / STATE_FILE).is_file() else None


def resume_candidate(root: Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint under `root` (its files as `files.json` lists them) and notes on the
    damaged newer ones skipped. None when there is no complete checkpoint at all.

    Raises:
        CheckpointError: a checkpoint holds pickles, or every one is damaged (naming the files).
    """
    return checkpoint_files.resume_candidate([folder for _, folder in list_checkpoints(root)], _pointed(root))


def save_checkpoint(accelerator, root: Path, state: TrainState, config_text: str, write_weights) -> Path:
    """Write `root/step-NNNNNN/` atomically and prune nothing (see `prune_checkpoints`).

    Args:
        write_weights: callable(folder) that writes the usable adapter/model file into the folder.

    Raises:
        CheckpointError: the disk is full or not writable; the half-written folder is removed and
            earlier checkpoints are untouched.
    """
    final = root / f"step-{state.step:06d}"
    tmp = root / f".step-{state.step:06d}.tmp"
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        accelerator.wait_for_everyone()
        kind = state_io.save_checkpoint_state(accelerator, tmp)  # every process writes its RNG state
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_weights(tmp)
            (tmp / CONFIG_FILE).write_text(config_text, encoding="utf-8")
            marker = state.to_json()
            checkpoint_files.write_manifest(tmp, {STATE_FILE: marker}, kind)
            # Written last: its presence marks the folder complete.
            (tmp / STATE_FILE).write_text(marker, encoding="utf-8")
            fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_text_atomic(root / "latest", final.name)
        accelerator.wait_for_everyone()
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(root).free / 2**30
            raise CheckpointError(
                f"{root}: disk full while saving step {state.step} ({free:.2f} GiB free); the partial "
                "checkpoint was removed and earlier ones are intact: free some space and rerun with --resume"
            ) from None
        raise CheckpointError(f"{final}: could not write checkpoint: {err}") from None
    return final


def prune_checkpoints(root: Path, keep_last: int, keep_weights: str | None = None) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, and stale temp folders.

    Args:
        keep_weights: the usable weight file's name inside each checkpoint (`<name>.safetensors`).
            When given, a pruned checkpoint's file is first moved beside the checkpoints folder as
            `<name>-step-NNNNNN.safetensors`, so every saved epoch or step stays usable.
    """
    removed = []
    for _, folder in list_checkpoints(root)[:-keep_last]:
        weights = folder / keep_weights if keep_weights else None
        if weights is not None and weights.is_file():
            os.replace(weights, root.parent / f"{weights.stem}-{folder.name}{weights.suffix}")
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    for stale in root.glob(".step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return removed


# --- resume (which checkpoint, and whether it may be continued: finetune.train.resume) ---------------

def check_fresh_start(root: Path) -> None:
    """A run started without --resume must not write over (and prune) an earlier run's checkpoints.

    Raises:
        CheckpointError: `root` holds a complete checkpoint; says how to continue or start over.
    """
    latest = latest_checkpoint(root)
    if latest is not None:
        raise CheckpointError(
            f"{root}: holds the checkpoints of an earlier run (latest: {latest.name}); a new run would write "
            "over them. Continue that run with --resume, or start a new one in another output.dir (its "
            "cache.dir may point at this run's cache: entries are keyed by what made them, so they are reused)")


def restore(accelerator, folder: Path, saved: TrainState, state: TrainState, changes: list[str]) -> Path:
    """Load the checkpoint in `folder` into the prepared run: the Accelerate state (models, optimizer,
    LR schedule, RNGs), and its progress `saved` into `state`.

    `changes` are the settings `--allow-changes` accepted (finetune.train.resume checked them) and a
    new run length; they are recorded in the state, so the outputs say the run is not reproducible.
    """
    state_io.load_checkpoint_state(accelerator, folder)
    state.step, state.epoch, state.batch_in_epoch = saved.step, saved.epoch, saved.batch_in_epoch
    state.images_seen, state.nan_steps_skipped = saved.images_seen, saved.nan_steps_skipped
    state.changed_on_resume = saved.changed_on_resume + [f"step {saved.step}: {c}" for c in changes]
    if changes:
        accelerator.print("resuming with these changes (recorded in the outputs' metadata; the run is marked not "
                          "reproducible):\n  " + "\n  ".join(changes))
    accelerator.print(f"resumed from {folder} (step {saved.step}, epoch {saved.epoch})")
    return folder


def register_trainable_only_hooks(acc) -> None:
    """Accelerate's own `save_state`/`load_state` (which checkpoints no longer call, FSDP aside) save the
    trained parameters only, as `state_io` does, by the bare model's names.
    """
    def save_hook(models, weights, output_dir):
        state_io.save_trained(acc, models, Path(output_dir))
        weights.clear()  # accelerate must not write the full state dicts as well

    def load_hook(models, input_dir):
        state_io.load_trained(acc, models, Path(input_dir))
        models.clear()  # loaded here; accelerate must not look for full state dicts

    acc.register_save_state_pre_hook(save_hook)
    acc.register_load_state_pre_hook(load_hook)
