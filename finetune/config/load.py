"""Reading a config: TOML, `--set section.key=value` overrides, paths resolved against the config
file's folder, and one `ConfigError` listing every problem as `file: dotted.key = value: what is allowed`.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

import tomli_w
import tomllib
from pydantic import BaseModel, ValidationError

from finetune.config.schema import TrainConfig
from finetune.errors import ConfigError

log = logging.getLogger(__name__)

# Keys that moved to another table, old dotted key -> new one. A user's TOML gets one line naming the
# new place; a checkpoint's saved config is migrated silently (`migrate_moved_keys`).
MOVED_KEYS = {
    "training.memory_profile": "memory.profile",
    "training.gradient_checkpointing": "memory.gradient_checkpointing",
    "training.gradient_checkpointing_mode": "memory.checkpointing_mode",
    **{f"training.{key}": f"memory.{key}" for key in (
        "base_dtype", "weight_dtype", "fused_backward", "compile", "compile_mode", "channels_last")},
}


def load_config(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read, override and validate a TOML config.

    Args:
        path: the TOML file; relative paths inside it resolve against its folder.
        overrides: `section.key=value` strings; values are TOML literals (`10`, `true`, `"a"`, `[1, 2]`)
            or bare strings.

    Settings this run ignores (`TrainConfig.ignored_settings`) are logged as warnings.

    Raises:
        ConfigError: listing every problem found, each with its dotted key.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (copy train_config.toml from the project and edit it)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    for item in overrides:
        apply_override(raw, item, source=str(path))
    cfg = validate_config(raw, base_dir=path.parent.resolve(), source=path.name)
    for line in cfg.ignored_settings():
        log.warning("warning: %s: %s", path.name, line)
    return cfg


def validate_config(raw: dict[str, Any], base_dir: Path, source: str = "config") -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as err:
        raise ConfigError("\n".join(_describe(e, raw, source) for e in err.errors())) from None


def apply_override(raw: dict[str, Any], item: str, source: str = "--set") -> None:
    """Apply one `section.key=value` to the raw TOML dict."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. training.max_steps=10")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word is a string: --set output.name=my_lora
    node: Any = raw
    parts = key.strip().split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):  # [[dataset.subsets]]: dataset.subsets.0.folder
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:i])} has {len(node)} table(s); "
                                  f"use an index from 0 to {len(node) - 1}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[:i])} is not a table")
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, {})


def _describe(error: dict, raw: dict[str, Any], source: str) -> str:
    loc = [str(p) for p in error["loc"]]
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        if key in MOVED_KEYS:
            return f"{source}: {key}: moved to {MOVED_KEYS[key]} (the [{MOVED_KEYS[key].split('.')[0]}] table)"
        hint = _suggest(loc)
        return f"{source}: {key}: unknown key{hint}"
    if error["type"] == "missing":
        model = table_model(loc)
        required = [name for name, field in (model.model_fields.items() if model else ()) if field.is_required()]
        if model is not None and required:  # a whole table is missing: name what it must hold
            return "\n".join(f"{source}: {key}.{name}: required ({model.model_fields[name].description})"
                             for name in required)
        return f"{source}: {key}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if "input" in error and error["type"] != "value_error":
        return f"{source}: {key} = {_short(error['input'])}: {message}"
    return f"{source}: {key + ': ' if key else ''}{message}"


def _inner_model(annotation) -> type[BaseModel] | None:
    inner = getattr(annotation, "__args__", (annotation,))
    return next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)


def table_model(loc: list[str]) -> type[BaseModel] | None:
    """The model of the table at `loc` (["training"], ["dataset", "subsets", "0"]); None where no table is."""
    model: type[BaseModel] = TrainConfig
    for part in loc:
        if part.isdigit():  # an item of a list of tables, e.g. [[dataset.subsets]]
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _inner_model(field.annotation)
        if model is None:
            return None
    return model


def _suggest(loc: list[str]) -> str:
    """' (did you mean learning_rate?)' for a misspelt key, from the fields of its table; for a key given
    without its table, the table that has it (' (did you mean training.max_steps?)')."""
    model = table_model(loc[:-1])
    if model is None:
        return ""
    if model is TrainConfig:
        homes = [f"{table}.{loc[-1]}" for table, field in TrainConfig.model_fields.items()
                 if loc[-1] in getattr(_inner_model(field.annotation), "model_fields", {})]
        if homes:
            return f" (did you mean {' or '.join(homes)}?)"
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else f" (allowed: {', '.join(model.model_fields)})"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def migrate_moved_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of a raw config (e.g. a checkpoint's) with keys from older releases in their new tables."""
    raw = {table: dict(value) if isinstance(value, dict) else value for table, value in raw.items()}
    for old, new in MOVED_KEYS.items():
        old_table, old_key = old.split(".")
        new_table, new_key = new.split(".")
        if isinstance(raw.get(old_table), dict) and old_key in raw[old_table]:
            raw.setdefault(new_table, {})[new_key] = raw[old_table].pop(old_key)
    return raw


def dump_config(cfg: TrainConfig) -> str:
    """The resolved config as TOML (paths absolute), saved next to outputs and in every checkpoint."""
    data = cfg.model_dump(mode="json", exclude_none=True)
    return tomli_w.dumps(data)
