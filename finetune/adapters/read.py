"""Reading LoRA files made by kohya, diffusers/PEFT, OneTrainer or this toolkit into one form."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.adapters.keys import te_path, text_name_table, unet_name_table
from finetune.errors import ModelError

KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


@dataclass
class LoraModule:
    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, scale: float = 1.0) -> torch.Tensor:
        """scale · (alpha / rank) · up @ down in fp32, shaped like the target weight."""
        from finetune.merge import lora_delta

        return lora_delta(self.up, self.down, self.alpha, scale)


@dataclass
class LoraFile:
    # (component, module path) -> module; component is "unet" (diffusers path) or "te1"/"te2"
    # (path with one `text_model.` level).
    modules: dict[tuple[str, str], LoraModule] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def read_lora(path: Path, unet_config: dict | None = None, te_layers: tuple[int, int] = (12, 32)) -> LoraFile:
    """Parse any supported LoRA file. Keys that match no module raise ModelError listing them.

    Args:
        unet_config: the target UNet's config (default: SDXL base), to decode kohya's `_` names.
        te_layers: layer counts of the two text encoders (SDXL: 12 and 32).
    """
    from safetensors import safe_open

    from finetune.models.configs import sdxl_unet_config

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelError(f"{path}: LoRA files are read as .safetensors only")
    with safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        metadata = fh.metadata() or {}
    if any(k.endswith(KOHYA_SUFFIXES) and k.startswith("lora_") for k in tensors):
        modules = _read_kohya(path, tensors, unet_config or sdxl_unet_config(), te_layers)
    else:
        modules = _read_peft(path, tensors, metadata)
    return LoraFile(modules, metadata)


def _read_kohya(path, tensors, unet_config, te_layers) -> dict:
    names = {**unet_name_table(unet_config), **text_name_table("te1", te_layers[0]), **text_name_table("te2", te_layers[1])}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in tensors.items():
        suffix = next((s for s in KOHYA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        grouped.setdefault(key[: -len(suffix)], {})[suffix] = value
    modules = {}
    for name, parts in grouped.items():
        if name not in names or ".lora_down.weight" not in parts or ".lora_up.weight" not in parts:
            unknown.append(name)
            continue
        component = "unet" if name.startswith("lora_unet_") else name[5:8]
        down = parts[".lora_down.weight"]
        alpha = float(parts[".alpha"]) if ".alpha" in parts else float(down.shape[0])
        modules[(component, names[name])] = LoraModule(down, parts[".lora_up.weight"], alpha)
    _refuse_unknown(path, unknown)
    return modules


def _read_peft(path, tensors, metadata) -> dict:
    """diffusers/PEFT keys: `unet.<path>.lora_A.weight` (also `lora.down`/`lora.up`), text encoders too."""
    configs = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    prefixes = {"unet.": "unet", "text_encoder.": "te1", "text_encoder_2.": "te2"}
    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in tensors.items():
        prefix = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
        kind = "down" if (".lora_A." in key or ".lora.down." in key) else "up" if (".lora_B." in key or ".lora.up." in key) else None
        if prefix is None or kind is None:
            unknown.append(key)
            continue
        module = key[len(prefix):].split(".lora_A.")[0].split(".lora_B.")[0].split(".lora.down")[0].split(".lora.up")[0]
        component = prefixes[prefix]
        module = te_path(module) if component != "unet" else module
        grouped.setdefault((component, module), {})[kind] = value
    modules = {}
    for (component, module), parts in grouped.items():
        prefix = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}[component]
        rank = parts["down"].shape[0]
        alpha = float(configs.get(f"{prefix}.alpha_pattern", {}).get(module, configs.get(f"{prefix}.lora_alpha", rank)))
        modules[(component, module)] = LoraModule(parts["down"], parts["up"], alpha)
    _refuse_unknown(path, unknown)
    return modules


def _refuse_unknown(path, unknown: list[str]) -> None:
    if unknown:
        shown = ", ".join(sorted(unknown)[:8])
        raise ModelError(f"{path}: {len(unknown)} key(s) match no SDXL module (is it an SDXL LoRA?): {shown}")
