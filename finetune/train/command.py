"""The command a run was started with (`<output.dir>/run.json`), so `--resume` continues with its settings.

A run started with `--set training.max_steps=12` must resume to step 12, not to the TOML's 1000: the
overrides are recorded beside the run and applied again on `--resume` (new ones win). A run whose
`output.dir` came from `--set` is found by the same override, which the resume hint prints.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from finetune.config import TrainConfig, load_config
from finetune.io import write_text_atomic

COMMAND_FILE = "run.json"


def record_command(output_dir: Path, config: Path, overrides: list[str]) -> None:
    """Write what the run was started (or last resumed) with."""
    write_text_atomic(Path(output_dir) / COMMAND_FILE, json.dumps(
        {"config": str(Path(config).resolve()), "overrides": list(overrides)}, indent=2) + "\n")


def recorded_overrides(output_dir: Path) -> list[str]:
    path = Path(output_dir) / COMMAND_FILE
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text(encoding="utf-8")).get("overrides", []))
    except (json.JSONDecodeError, AttributeError):
        return []


def config_for_resume(config: Path, overrides: list[str]) -> tuple[TrainConfig, list[str]]:
    """The config a `--resume` continues with: the TOML, the run's recorded overrides, then `overrides`.

    Returns:
        (the config, the overrides it applied, recorded ones first)
    """
    cfg = load_config(config, overrides)
    remembered = [item for item in recorded_overrides(cfg.output.dir) if _key(item) not in {_key(o) for o in overrides}]
    if not remembered:
        return cfg, list(overrides)
    applied = remembered + list(overrides)
    return load_config(config, applied), applied


def resume_hint(config: Path, overrides: list[str]) -> str:
    """A command that continues the run, overrides included (quoted for a POSIX shell)."""
    words = ["finetune", "train", str(config), "--resume"]
    for item in overrides:
        words += ["--set", item]
    return shlex.join(words)


def _key(item: str) -> str:
    return item.partition("=")[0].strip()
