"""The run's record of how it was started: `config.resolved.toml` (the config it trained with) and
`run.json` (the TOML and the `--set` overrides), both written once setup is complete, so a refused
resume changes neither.

A run started with `--set training.max_steps=12` must resume to step 12, not to the TOML's 1000: the
overrides are recorded beside the run and applied again on `--resume` (new ones win). They are
recorded resolved (`output.dir=/abs/run`, not `output.dir=run`), so applying them again from any
folder gives the same run. The run's own `config.resolved.toml` already holds them.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import tomli_w

from finetune.config import TrainConfig, dump_config, load_config
from finetune.errors import ConfigError
from finetune.io import write_text_atomic

COMMAND_FILE = "run.json"
RESOLVED_CONFIG = "config.resolved.toml"


def record_run(cfg: TrainConfig, config: Path | None, overrides: list[str]) -> None:
    """Write `config.resolved.toml` and `run.json` for a run whose setup is complete (a resume: accepted).

    Args:
        config: the TOML the command named; a resume keeps the one the run was started from.
        overrides: every override in effect (a resume's: the recorded ones and the new ones).
    """
    folder = Path(cfg.output.dir)
    write_text_atomic(folder / RESOLVED_CONFIG, dump_config(cfg))
    if config is None:  # called from Python without a command: run.json (if any) stays as the CLI wrote it
        return
    started_from = _recorded(folder).get("config") or str(Path(config).resolve())
    record = {"config": started_from, "overrides": resolved_overrides(cfg, overrides)}
    write_text_atomic(folder / COMMAND_FILE, json.dumps(record, indent=2) + "\n")


def resolved_overrides(cfg: TrainConfig, overrides: list[str]) -> list[str]:
    """Each `key=value` with its text as the run resolved it (paths absolute), so it means the same from any folder."""
    data = cfg.model_dump(mode="json")
    out = []
    for item in overrides:
        key = _key(item)
        text = _toml_value(_dotted(data, key))
        out.append(item if text is None else f"{key}={text}")
    return out


def recorded_overrides(output_dir: Path) -> list[str]:
    return [str(item) for item in _recorded(Path(output_dir)).get("overrides", [])]


def config_for_resume(config: Path, overrides: list[str]) -> tuple[TrainConfig, list[str]]:
    """The config a `--resume` continues with: the TOML, the run's recorded overrides, then `overrides`.

    The run's own `config.resolved.toml` holds the recorded overrides already: they are not applied twice.

    Returns:
        (the config, every override in effect, recorded ones first)
    """
    cfg = load_config(config, overrides)
    new_keys = {_key(o) for o in overrides}
    applied = [item for item in recorded_overrides(cfg.output.dir) if _key(item) not in new_keys] + list(overrides)
    if is_resolved_config(config, cfg) or applied == list(overrides):
        return cfg, applied
    return load_config(config, applied), applied


def is_resolved_config(config: Path, cfg: TrainConfig) -> bool:
    """True when `config` is the `config.resolved.toml` of the run it configures."""
    return Path(config).resolve() == (Path(cfg.output.dir) / RESOLVED_CONFIG).resolve()


def run_config_of(resume: str) -> tuple[Path, str]:
    """`finetune train --resume RUN_DIR` (or a checkpoint folder): the run's resolved config and what to resume.

    Raises:
        ConfigError: the folder is neither a run folder nor one of its checkpoints.
    """
    folder = Path(resume)
    if (folder / RESOLVED_CONFIG).is_file():
        return folder / RESOLVED_CONFIG, "latest"
    run = folder.parent.parent  # <run>/checkpoints/step-NNNNNN
    if (run / RESOLVED_CONFIG).is_file() and folder.parent.name == "checkpoints":
        return run / RESOLVED_CONFIG, str(folder)
    raise ConfigError(f"--resume {resume}: no {RESOLVED_CONFIG} there (nor is it a checkpoint of a run folder); "
                      "name the config too: finetune train CONFIG --resume")


def resume_hint(config: Path, cfg: TrainConfig, overrides: list[str], extra: list[str] = ()) -> str:
    """A command that continues the run (quoted for a POSIX shell), with `extra` overrides.

    From the TOML: the TOML, --resume and the run's overrides, resolved. From the run's own resolved
    config (or folder): `finetune train --resume RUN_DIR`, which needs nothing else.
    """
    replaced = {_key(item) for item in extra}
    if is_resolved_config(config, cfg):
        words, kept = ["finetune", "train", "--resume", str(cfg.output.dir)], []
    else:
        words = ["finetune", "train", str(config), "--resume"]
        kept = [item for item in resolved_overrides(cfg, overrides) if _key(item) not in replaced]
    for item in [*kept, *extra]:
        words += ["--set", item]
    return shlex.join(words)


def _recorded(folder: Path) -> dict:
    path = folder / COMMAND_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _dotted(data, key: str):
    for part in key.split("."):
        if isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        elif isinstance(data, dict):
            data = data.get(part)
        else:
            return None
    return data


def _toml_value(value) -> str | None:
    """A one-line TOML literal for a string or a list of strings, where a path is resolved; None for the rest
    (numbers, tables), which mean the same from any folder and are kept as written (`3e-4` stays `3e-4`)."""
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return tomli_w.dumps({"v": value}).strip().removeprefix("v = ")
    return None


def _key(item: str) -> str:
    return item.partition("=")[0].strip()
