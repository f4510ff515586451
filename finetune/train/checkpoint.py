"""Checkpoints and resume: `checkpoints/step-NNNNNN/` written whole or not at all, `latest` last; loading one
back into a prepared run (`finetune.train.resume` decides which, and whether the config still fits).

A checkpoint holds the Accelerate state (trainable weights, optimizer, LR scheduler, grad scaler,
RNG of every process), `train_state.json` (the one resume object), the resolved config and a usable
adapter/model `.safetensors`. It is written into a hidden temp folder and renamed; a folder without
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

import torch
from safetensors.torch import load_file, save_file

from finetune.errors import CheckpointError
from finetune.io import fsync_tree, write_text_atomic

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
    """The folder named by `latest` if it is complete, else the newest complete one."""
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    found = list_checkpoints(root)
    return found[-1][1] if found else None


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
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))  # every process writes its RNG state; main writes the rest
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_weights(tmp)
            (tmp / CONFIG_FILE).write_text(config_text, encoding="utf-8")
            # Written last: its presence marks the folder complete.
            (tmp / STATE_FILE).write_text(state.to_json(), encoding="utf-8")
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
    accelerator.load_state(str(folder))
    state.step, state.epoch, state.batch_in_epoch = saved.step, saved.epoch, saved.batch_in_epoch
    state.images_seen, state.nan_steps_skipped = saved.images_seen, saved.nan_steps_skipped
    state.changed_on_resume = saved.changed_on_resume + [f"step {saved.step}: {c}" for c in changes]
    if changes:
        accelerator.print("resuming with these changes (recorded in the outputs' metadata; the run is marked not "
                          "reproducible):\n  " + "\n  ".join(changes))
    accelerator.print(f"resumed from {folder} (step {saved.step}, epoch {saved.epoch})")
    return folder


def register_trainable_only_hooks(acc) -> None:
    """Checkpoints hold the trained parameters only (a LoRA checkpoint is MBs, not the 5 GB UNet).

    Names are the bare model's, so a checkpoint reads the same with or without DDP or torch.compile.
    """
    def trained_parameters(model) -> dict:
        bare = acc.unwrap_model(model, keep_torch_compile=False)
        return {n: p for n, p in bare.named_parameters() if p.requires_grad}

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            trained = {n: p.detach().cpu().contiguous() for n, p in trained_parameters(model).items()}
            save_file(trained, str(Path(output_dir) / f"trainable_{i}.safetensors"))
        weights.clear()  # accelerate must not write the full state dicts as well

    def load_hook(models, input_dir):
        for i, model in enumerate(models):
            saved = load_file(str(Path(input_dir) / f"trainable_{i}.safetensors"))
            saved = {_bare_name(n): v for n, v in saved.items()}  # checkpoints that kept a wrapper's prefix
            params = trained_parameters(model)
            if set(params) != set(saved):
                raise CheckpointError(f"{input_dir}: its trained weights do not match this model's "
                                      f"({len(set(params) ^ set(saved))} names differ)")
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)
        models.clear()  # loaded here; accelerate must not look for full state dicts

    acc.register_save_state_pre_hook(save_hook)
    acc.register_load_state_pre_hook(load_hook)


def _bare_name(name: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name
