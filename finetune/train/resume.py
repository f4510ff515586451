"""The one resume point: which checkpoint `--resume` continues, what it holds, and whether this config may
continue it.

Every way to resume (`finetune train CONFIG --resume`, `finetune train RUN/config.resolved.toml --resume`,
`finetune train --resume RUN`, the studio's Resume) builds one `ResumePoint` at the start of `train()`:
the checkpoint folder is found, and its state and config are read, here and only here. The checks run
before anything in the run folder is written, so a refused resume leaves every file as it was.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path

from bucketing.manifest import load_manifest
from finetune.config import TrainConfig, dump_config, frozen_keys, migrate_moved_keys, table_model
from finetune.dataset import build_dataset, dataset_hash
from finetune.errors import CheckpointError, ConfigError
from finetune.io import replace_dir
from finetune.plan import split_rows
from finetune.train import checkpoint_files
from finetune.train.checkpoint import CONFIG_FILE, STATE_FILE, TrainState, resume_candidate
from finetune.train.optim import lr_after


@dataclass(frozen=True)
class ResumePoint:
    """A complete checkpoint, read once: its folder, its progress and the config it was trained with."""

    folder: Path
    state: TrainState
    config: dict  # the raw resolved config of the run at that step (keys of older releases moved)

    def weights_path(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"


def resume_point(checkpoints_dir: Path, resume: str) -> ResumePoint:
    """The checkpoint `--resume` names ("latest" or a checkpoint folder), read.

    Raises:
        CheckpointError: no complete checkpoint, or one whose state or config cannot be read (names the file).
    """
    folder = _find_folder(Path(checkpoints_dir), resume)
    try:
        state = TrainState.from_file(folder / STATE_FILE)
    except (OSError, ValueError, TypeError, AttributeError) as err:  # JSONDecodeError; a non-object
        raise CheckpointError(f"{folder / STATE_FILE}: cannot be read ({err}); resume from an earlier checkpoint "
                              f"with --resume {folder.parent}/step-NNNNNN") from None
    try:
        config = migrate_moved_keys(tomllib.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise CheckpointError(f"{folder / CONFIG_FILE}: cannot be read ({err}); resume from an earlier checkpoint "
                              f"with --resume {folder.parent}/step-NNNNNN") from None
    return ResumePoint(folder, state, config)


def _find_folder(root: Path, resume: str) -> Path:
    """"latest": the newest intact checkpoint (its files checked against files.json; damaged newer ones
    are named and skipped); a folder: that checkpoint, checked the same way."""
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


def target_steps(point: ResumePoint, training) -> int | None:
    """The step the resumed run ends at, when it is known before the data is planned.

    A `max_epochs` run resumed with the same `max_epochs` ends where the checkpoint's run planned to
    (its config holds the steps that many epochs made); otherwise the current `max_steps`.
    """
    if training.max_epochs is None:
        return training.max_steps
    saved = point.config.get("training", {})
    if saved.get("max_epochs") == training.max_epochs and isinstance(saved.get("max_steps"), int):
        return saved["max_steps"]
    return None


def finished(point: ResumePoint, training, adapter_path: Path) -> bool:
    """True when the run already reached its last step and wrote its weights: `--resume` has nothing to do.

    Raises:
        ConfigError: training.max_steps is below the checkpoint's step.
    """
    target = target_steps(point, training)
    if target is None or point.state.step < target:
        return False
    if point.state.step > target:
        raise ConfigError(f"training.max_steps = {target} is below the checkpoint's step {point.state.step} "
                          f"({point.folder}): set it above {point.state.step} to train further")
    return adapter_path.is_file()  # stopped on its last step without the final file: finish it


def with_checkpoint_profile(cfg: TrainConfig, point: ResumePoint) -> TrainConfig:
    """`auto` on resume keeps the profile the stopped run chose: free memory moves, the run must not."""
    chosen = point.config.get("memory", {}).get("profile", "auto")
    if cfg.memory.profile != "auto" or chosen == "auto":
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.memory.profile = chosen
    return cfg


def check_process_count(point: ResumePoint, num_processes: int) -> None:
    """Refuse at once (before loading models and building caches) a resume with another process count.

    Raises:
        CheckpointError: naming both counts and the launch flag that resumes.
    """
    saved = point.state.num_processes
    if saved != num_processes:
        raise CheckpointError(
            f"{point.folder}: cannot resume: processes: {saved} in the checkpoint, {num_processes} now (each "
            "process holds its own place in the data order, its own RNG state and, with FSDP, its own shard): "
            f"launch with --num_processes {saved} (machines x GPUs per machine), or start a new run from this "
            "checkpoint's weights (a LoRA: lora.init_from)")


def check_config(point: ResumePoint, cfg: TrainConfig, allow_changes: bool = False) -> list[str]:
    """Refuse a resume whose frozen settings changed (`cfg` resolved as the run will train it).

    Settings that cannot change the math already done (max_steps, cadences, prompts, logging) change
    freely. With `allow_changes` the others are accepted too and returned, so the run can say so.

    Raises:
        CheckpointError: listing every difference and the ways forward.
    """
    changes = resume_conflicts(point.config, tomllib.loads(dump_config(cfg)))
    return _accept(point, changes, cfg.output.name, allow_changes)


def training_rows_hash(manifest, validation_split: float, seed: int) -> str:
    """The data identity a checkpoint records (`TrainState.dataset_hash`): the manifest's training rows,
    the validation hold-out left out as `builders.build_data` leaves it out."""
    train_rows, val_rows = split_rows(list(manifest["fingerprint"]), validation_split, seed)
    return dataset_hash(manifest.select(train_rows) if val_rows else manifest)


def check_dataset(point: ResumePoint, dataset_hash: str, output_name: str, allow_changes: bool = False) -> list[str]:
    """Refuse a resume whose training rows (images, captions, crops, order) changed since the checkpoint."""
    changed = bool(point.state.dataset_hash) and point.state.dataset_hash != dataset_hash
    changes = ["dataset: the images, captions or crops changed since the checkpoint"] if changed else []
    return _accept(point, changes, output_name, allow_changes)


def _accept(point: ResumePoint, changes: list[str], output_name: str, allow_changes: bool) -> list[str]:
    if changes and not allow_changes:
        raise CheckpointError(
            f"{point.folder}: cannot resume, the config changed in ways that would make the result differ from an "
            "uninterrupted run:\n  " + "\n  ".join(changes)
            + "\nrestore those settings; or resume with --allow-changes to accept them (the run is then marked "
            "not reproducible); or start a new run in another output.dir from this checkpoint's weights with "
            f"lora.init_from = {json.dumps(str(point.weights_path(output_name)))}")
    return changes


def schedule_change(point: ResumePoint, training, optimizer) -> str | None:
    """What the LR schedule does after a resume that changed the run's length (training.max_steps).

    The schedule is recomputed over the new length, as kohya's scripts do on resume: a longer cosine run
    decays more slowly from here on. Said, and kept in the outputs' metadata, never a silent jump.
    """
    old = point.config.get("training", {}).get("max_steps")
    if not isinstance(old, int) or old == training.max_steps or optimizer.scheduler == "constant":
        return None
    done = point.state.step
    before = lr_after(optimizer, training.learning_rate, old, done)
    after = lr_after(optimizer, training.learning_rate, training.max_steps, done)
    if before is None or after is None:
        return None
    return (f"training.max_steps: {old} in the checkpoint, {training.max_steps} now: the {optimizer.scheduler} "
            f"schedule is recomputed over {training.max_steps} steps; the learning rate at step {done + 1} is "
            f"{after:.3g} (the old schedule's was {before:.3g})")


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


def run_manifest(acc, cfg: TrainConfig, point: ResumePoint | None, allow_changes: bool = False):
    """The run's manifest: planned by the main process, read by every process. A resume's is written
    beside the run's and replaces it only once its training rows match the checkpoint's; refused, the
    run's manifest stays as it was.

    Returns:
        (the manifest, the data change accepted with `allow_changes`: empty when the rows match)
    """
    target = cfg.output.manifest_dir
    folder = target if point is None else target.with_name(".manifest-resume")
    if acc.is_main_process:
        acc.print(build_dataset(cfg.dataset, cfg.training.seed, folder).report_text)
    acc.wait_for_everyone()
    manifest = load_manifest(folder)
    if point is None:
        return manifest, []
    acc.wait_for_everyone()  # every process has read the staged manifest before it is moved or removed
    try:
        changes = check_dataset(point, training_rows_hash(manifest, cfg.validation.split, cfg.training.seed),
                                cfg.output.name, allow_changes)
    except CheckpointError:
        if acc.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if acc.is_main_process:
        replace_dir(folder, target)
    acc.wait_for_everyone()
    return load_manifest(target), changes
