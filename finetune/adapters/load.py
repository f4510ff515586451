"""Starting training from an existing LoRA file (`lora.init_from`): its values go into the injected adapter."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.adapters.read import read_lora
from finetune.adapters.save import lora_layers
from finetune.errors import ConfigError


def load_adapter_weights(unet, text_encoders, path: Path) -> int:
    """Copy the file's down/up weights into the matching adapter layers; returns the modules loaded.

    The file's alpha/rank scale is folded into the up weights, so the adapter reproduces the file's delta
    whatever `lora.alpha` says.
    """
    lora = read_lora(Path(path), unet_config=dict(unet.config))
    parts = [("unet", unet)] + list(zip(("te1", "te2"), text_encoders or ()))
    loaded = 0
    for component, model in parts:
        for name, layer in lora_layers(model):
            key = (component, name if component == "unet" else _te(name))
            module = lora.modules.get(key)
            if module is None:
                continue
            down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            if down.shape != module.down.shape or up.shape != module.up.shape:
                raise ConfigError(f"lora.init_from = {path}: {name} has rank {module.rank} in the file; "
                                  f"set lora.rank = {module.rank}")
            ratio = (module.alpha / module.rank) / layer.scaling["default"]
            with torch.no_grad():
                down.copy_(module.down)
                up.copy_(module.up * ratio)
            loaded += 1
    if loaded == 0:
        raise ConfigError(f"lora.init_from = {path}: none of its modules match the adapter (check lora.targets)")
    return loaded


def _te(name: str) -> str:
    return name if name.startswith("text_model.") else f"text_model.{name}"
