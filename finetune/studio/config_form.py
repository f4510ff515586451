"""The config form's logic: fields generated from the pydantic schema, the TOML document they edit, live validation.

Fields come from `TrainConfig.model_fields` (each table, each key's description, default and
Literal choices), so a key added or moved in `finetune.config` appears here without an edit. The
document is a tomlkit one: saving it keeps the user's comments and key order. Only keys the user
touches are written, so memory profiles still see which keys were set. Validation is
`finetune.config.validate_config`, the CLI's own, and each message is shown next to its key.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tomlkit
import tomllib
from pydantic import BaseModel

from finetune.config import TrainConfig, validate_config
from finetune.errors import ConfigError
from finetune.io import write_text_atomic

LIST_ITEM = "0"  # a list of tables ([[dataset.subsets]]) is edited through its first table


@dataclass(frozen=True)
class FieldSpec:
    path: tuple[str, ...]  # ("training", "learning_rate"), ("dataset", "subsets", "0", "folder")
    kind: str  # bool, choice, int, float, path, text, toml
    description: str
    default: Any  # None when the key has no default (required) or defaults to None
    required: bool
    choices: tuple = ()

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def section(self) -> str:
        return ".".join(p for p in self.path[:-1] if p != LIST_ITEM)


def _unwrap(annotation) -> tuple[Any, bool]:
    """(annotation without None, whether None was allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else annotation), len(args) < len(typing.get_args(annotation))
    return annotation, False


def _kind(annotation) -> tuple[str, tuple]:
    if typing.get_origin(annotation) is Literal:
        return "choice", typing.get_args(annotation)
    if annotation is bool:
        return "bool", ()
    if annotation in (int, float):
        return annotation.__name__, ()
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return "path", ()
    if annotation is str:
        return "text", ()
    return "toml", ()  # lists, dicts, tuples: typed as a TOML value, e.g. [0, 1] or {"mid_block" = 0.5}


def _table_of(annotation) -> type[BaseModel] | None:
    """The model of a table field, or of the items of a list of tables."""
    annotation, _ = _unwrap(annotation)
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def form_fields(model: type[BaseModel] | None = None, prefix: tuple[str, ...] = ()) -> list[FieldSpec]:
    """Every key of the config, table by table, in the schema's order."""
    model = model or TrainConfig
    specs = []
    for name, field in model.model_fields.items():
        table = _table_of(field.annotation)
        if table is not None:
            is_list = typing.get_origin(_unwrap(field.annotation)[0]) is list
            specs += form_fields(table, prefix + (name, LIST_ITEM) if is_list else prefix + (name,))
            continue
        annotation, optional = _unwrap(field.annotation)
        kind, choices = _kind(annotation)
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        specs.append(FieldSpec(prefix + (name,), kind, field.description or "", default,
                               field.is_required(), choices))
    return specs


def sections(specs: list[FieldSpec]) -> dict[str, list[FieldSpec]]:
    grouped: dict[str, list[FieldSpec]] = {}
    for spec in specs:
        grouped.setdefault(spec.section, []).append(spec)
    return grouped


# --- the TOML document ---------------------------------------------------------------------------


def parse_document(text: str):
    return tomlkit.parse(text)


def get_value(doc, path: tuple[str, ...]) -> Any:
    """The value at `path` in the document, or None where the key is not written."""
    node = doc
    for part in path:
        if part == LIST_ITEM:
            if not isinstance(node, list) or not node:
                return None
            node = node[0]
        elif hasattr(node, "get"):
            node = node.get(part)
        else:
            return None
        if node is None:
            return None
    return node.unwrap() if hasattr(node, "unwrap") else node


def set_value(doc, path: tuple[str, ...], value: Any) -> None:
    """Write (or with None, remove) the key at `path`, creating its tables; comments elsewhere stay."""
    node = doc
    for i, part in enumerate(path[:-1]):
        if part == LIST_ITEM:
            if not len(node):
                node.append(tomlkit.table())
            node = node[0]
            continue
        if part not in node:
            if value is None:
                return  # nothing to remove
            node[part] = tomlkit.aot() if path[i + 1] == LIST_ITEM else tomlkit.table()
        node = node[part]
    key = path[-1]
    if value is None:
        if key in node:
            del node[key]
    else:
        node[key] = value


def field_value(spec: FieldSpec, raw: Any) -> tuple[Any, str | None]:
    """(value to write, problem) for what the form holds: "" unsets the key (its default applies).

    Numbers and TOML values are read as `--set section.key=value` reads them, so the config's own
    validation sees exactly what the CLI would and answers with the same message.
    """
    if spec.kind == "bool":
        return bool(raw), None
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None, None
    if spec.kind in ("choice", "path", "text"):
        return str(raw) if spec.kind != "text" else raw, None
    text = str(raw).strip()
    try:
        return tomllib.loads(f"v = {text}")["v"], None
    except tomllib.TOMLDecodeError:
        return text, None  # a bare word: validation says what type the key wants


def shown_value(spec: FieldSpec, value: Any) -> Any:
    """How a written value appears in the form."""
    if value is None:
        return spec.default if spec.kind in ("bool", "choice") else ""
    if spec.kind == "toml":
        return tomlkit.item(value).as_string()
    return value if spec.kind in ("bool", "choice") else str(value)


# --- validation ----------------------------------------------------------------------------------


def validate(doc, config_path: Path, workspace=None) -> tuple[Any, dict[str, str], list[str]]:
    """(TrainConfig or None, {dotted key: message}, every message): `validate_config`, as the CLI runs it.

    With a workspace, path keys that resolve outside it are refused too (the studio would have to
    read them).
    """
    config_path = Path(config_path)
    keys = {spec.dotted for spec in form_fields()}
    errors: dict[str, str] = {}
    messages: list[str] = []
    if workspace is not None:
        for spec in form_fields():
            value = get_value(doc, spec.path)
            if spec.kind == "path" and isinstance(value, str) and value:
                candidate = (config_path.parent / Path(value).expanduser())
                if not candidate.resolve().is_relative_to(workspace.root):
                    line = (f"{config_path.name}: {spec.dotted} = {value!r}: outside the workspace "
                            f"{workspace.root}; the studio only reads and writes inside it")
                    errors.setdefault(spec.dotted, line)
                    messages.append(line)
    try:
        cfg = validate_config(doc.unwrap(), base_dir=config_path.parent.resolve(), source=config_path.name)
    except ConfigError as err:
        for line in str(err).splitlines():
            messages.append(line)
            errors.setdefault(message_key(line, config_path.name, keys) or "", line)
        return None, errors, messages
    return (None if messages else cfg), errors, messages


def message_key(line: str, source: str, keys: set[str]) -> str | None:
    """The dotted key a ConfigError line is about ("model: pretrained: ..." -> model.pretrained)."""
    rest = line.removeprefix(f"{source}: ")
    parts = [p.split(" = ")[0].strip() for p in rest.split(": ")]
    key = parts[0]
    if key in keys:
        return key
    # A table's own check names its key in the message: "dataset.subsets.0: folder: ...".
    for extra in parts[1:2]:
        joined = f"{key}.{extra}"
        if joined in keys:
            return joined
        if f"{key}.{LIST_ITEM}.{extra}" in keys:
            return f"{key}.{LIST_ITEM}.{extra}"
    # A cross-field rule starts with the key it is about: "dataset.shuffle_tags = true changes ...".
    first = rest.split(" ")[0]
    return first if first in keys else None


def save_document(doc, path: Path) -> Path:
    """Write the document as TOML, atomically; comments and order are the user's."""
    write_text_atomic(Path(path), tomlkit.dumps(doc))
    return Path(path)
