"""Checkpoints and resume: `checkpoints/step-NNNNNN/` written whole or not at all, `latest` last; which
checkpoint `--resume` means and whether the config still fits it.

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

import tomllib

from finetune.config import TrainConfig, dump_config, frozen_keys, migrate_moved_keys, table_model
from finetune.errors import CheckpointError, ConfigError
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


# --- resume --------------------------------------------------------------------------------------

def resume_conflicts(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between the checkpoint's config and the current one."""
    conflicts = []
    for key in frozen_keys():
        old, new = _get(saved, key), _get(current, key)
        if old != new:
            conflicts.extend(_diff(key, old, new))
    return conflicts


def _get(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _diff(prefix: str, old, new) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                out.extend(_diff(f"{prefix}.{key}", old.get(key), new.get(key)))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and all(
            isinstance(item, dict) for item in old + new):  # [[dataset.subsets]]: table by table
        return [line for i, (a, b) in enumerate(zip(old, new)) for line in _diff(f"{prefix}.{i}", a, b)]
    if old is None and new == _default_of(prefix):
        return []  # a key newer than the checkpoint, left at its default: the old run behaved so too
    return [f"{prefix}: {old!r} in the checkpoint, {new!r} now"]


def _default_of(dotted: str):
    """The default of a config key, as the resolved TOML writes it (None when it has none)."""
    *table, key = dotted.split(".")
    model = table_model(table)
    field = model.model_fields.get(key) if model is not None else None
    if field is None:
        return None
    value = field.get_default(call_default_factory=True)
    return list(value) if isinstance(value, tuple) else value


def find_resume_folder(root: Path, resume: str) -> Path:
    """The checkpoint folder `--resume` names: "latest" or a path.

    Raises:
        CheckpointError: there is no complete checkpoint to resume (names the folder looked in).
    """
    if resume == "latest":
        folder, notes = resume_candidate(root)
        checkpoint_files.say_once(notes)
        if folder is None:
            raise CheckpointError(f"--resume: no complete checkpoint in {root}; start the run without --resume "
                                  "(or point output.dir at the run to continue)")
        return folder
    folder = Path(resume)
    if not (folder / STATE_FILE).is_file():
        raise CheckpointError(f"{folder}: not a complete checkpoint (no {STATE_FILE}); use --resume for the latest")
    checkpoint_files.check_intact(folder)
    return folder


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


def check_resumable(folder: Path, cfg: TrainConfig, state: TrainState, allow_changes: bool = False) -> list[str]:
    """Refuse a resume that could not continue exactly: the config, dataset or process count changed.

    Settings that cannot change the math already done (max_steps, cadences, prompts, logging) change
    freely. With `allow_changes` the others are accepted too and returned, so the run can say so.

    Returns:
        the changes accepted (empty without `allow_changes`).

    Raises:
        CheckpointError: listing every difference and the ways forward.
    """
    saved_cfg = migrate_moved_keys(tomllib.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")))
    changes = resume_conflicts(saved_cfg, tomllib.loads(dump_config(cfg)))
    saved = TrainState.from_file(folder / STATE_FILE)
    if saved.dataset_hash and saved.dataset_hash != state.dataset_hash:
        changes.append("dataset: the images, captions or crops changed since the checkpoint")
    check_process_count(folder, state.num_processes)  # the sampler's shards: never accepted
    if changes and not allow_changes:
        raise CheckpointError(
            f"{folder}: cannot resume, the config changed in ways that would make the result differ from an "
            "uninterrupted run:\n  " + "\n  ".join(changes)
            + "\nrestore those settings; or resume with --allow-changes to accept them (the run is then marked "
            "not reproducible); or start a new run in another output.dir from this checkpoint's weights with "
            f"lora.init_from = \"{folder / (cfg.output.name + '.safetensors')}\"")
    return changes


def restore(accelerator, cfg: TrainConfig, resume: str, state: TrainState, allow_changes: bool = False) -> Path:
    """Load the checkpoint `resume` names into the prepared run: the Accelerate state (models,
    optimizer, LR schedule, RNGs, sampler position), and its progress into `state`.

    `state` holds this run's seed, process count and dataset hash, checked against the checkpoint
    first (`check_resumable`). Returns the checkpoint folder.
    """
    folder = find_resume_folder(cfg.output.checkpoints_dir, resume)
    changes = check_resumable(folder, cfg, state, allow_changes)
    state_io.load_checkpoint_state(accelerator, folder)
    saved = TrainState.from_file(folder / STATE_FILE)
    state.step, state.epoch, state.batch_in_epoch = saved.step, saved.epoch, saved.batch_in_epoch
    state.images_seen, state.nan_steps_skipped = saved.images_seen, saved.nan_steps_skipped
    state.changed_on_resume = saved.changed_on_resume + [f"step {saved.step}: {c}" for c in changes]
    if changes:
        accelerator.print("--allow-changes: resuming with these changes (the run is now marked not "
                          "reproducible):\n  " + "\n  ".join(changes))
    accelerator.print(f"resumed from {folder} (step {saved.step}, epoch {saved.epoch})")
    return folder


def finished_run(cfg: TrainConfig, resume: str) -> TrainState | None:
    """The checkpoint's state when `--resume` has nothing left to train (the run already reached max_steps).

    Raises:
        CheckpointError: no checkpoint to resume.
        ConfigError: training.max_steps is below the checkpoint's step.
    """
    folder = find_resume_folder(cfg.output.checkpoints_dir, resume)
    saved = TrainState.from_file(folder / STATE_FILE)
    if cfg.training.max_epochs is not None or saved.step < cfg.training.max_steps:
        return None
    if saved.step > cfg.training.max_steps:
        raise ConfigError(f"training.max_steps = {cfg.training.max_steps} is below the checkpoint's step "
                          f"{saved.step} ({folder}): set it above {saved.step} to train further")
    return saved if cfg.output.adapter_path.is_file() else None  # stopped on its last step: finish it


def check_process_count(folder: Path, num_processes: int) -> None:
    """Refuse at once (before loading models and building caches) a resume with another process count.

    Raises:
        CheckpointError: naming both counts and the launch flag that resumes.
    """
    saved = TrainState.from_file(folder / STATE_FILE)
    if saved.num_processes != num_processes:
        raise CheckpointError(f"{folder}: cannot resume: {_process_count_problem(saved.num_processes, num_processes)}")


def _process_count_problem(saved: int, now: int) -> str:
    return (f"processes: {saved} in the checkpoint, {now} now (each process holds its own place in the data order, "
            f"its own RNG state and, with FSDP, its own shard): launch with --num_processes {saved} (machines x GPUs "
            "per machine), or start a new run from this checkpoint's weights (a LoRA: lora.init_from)")


def profile_of_checkpoint(cfg: TrainConfig, resume: str) -> TrainConfig:
    """`auto` on resume keeps the profile the stopped run chose: free memory moves, the run must not."""
    folder = find_resume_folder(cfg.output.checkpoints_dir, resume)
    saved = migrate_moved_keys(tomllib.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")))
    chosen = saved.get("memory", {}).get("profile", "auto")
    if chosen == "auto":  # a checkpoint from before auto recorded its choice
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.memory.profile = chosen
    return cfg


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
