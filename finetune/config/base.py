"""What every config table shares: unknown keys are errors, paths resolve against the config's folder,
and the FROZEN mark for keys a resume must find unchanged."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationInfo

# Marks a field that must keep its value on resume (the optimizer state, the data order or the step
# math depend on it). Read by `frozen_keys`.
FROZEN = {"frozen_on_resume": True}


class Section(BaseModel):
    """Base of every table: unknown keys are errors, assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _resolve(value: Path | None, info: ValidationInfo) -> Path | None:
    """Relative paths are relative to the config file's folder, not to the shell's."""
    if value is None:
        return None
    base = (info.context or {}).get("base_dir")
    value = Path(value).expanduser()
    return (Path(base) / value).resolve() if base and not value.is_absolute() else value
