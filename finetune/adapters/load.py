"""Starting training from an existing LoRA file (`lora.init_from`): its values go into the injected adapter."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.adapters.modules import LohaModule, LokrModule, LoraModule
from finetune.adapters.read import read_lora
from finetune.adapters.save import adapter_layers, layer_variant
from finetune.errors import ConfigError


def load_adapter_weights(unet, text_encoders, path: Path) -> int:
    """Copy the file's weights into the matching adapter layers; returns the number of modules loaded.

    The file's scale (alpha/rank) is folded into one factor, so the adapter reproduces the file's
    change whatever `lora.alpha` says. Layers the file does not cover keep their fresh (zero-effect) init.

    Raises:
        ConfigError: the file's variant or ranks differ from the injected adapter's, or nothing matches.
    """
    text_configs = tuple(dict(e.config.to_dict()) for e in text_encoders) if text_encoders else None
    lora = read_lora(Path(path), unet_config=dict(unet.config), text_configs=text_configs)
    parts = [("unet", unet)] + list(zip(("te1", "te2"), text_encoders or ()))
    loaded = 0
    for component, model in parts:
        for name, layer in adapter_layers(model):
            key = (component, name if component == "unet" else _te(name))
            module = lora.modules.get(key)
            if module is None:
                continue
            with torch.no_grad():
                _copy(layer, module, f"lora.init_from = {path}: {name}")
            loaded += 1
    if loaded == 0:
        raise ConfigError(f"lora.init_from = {path}: none of its modules match the adapter "
                          "(check lora.targets and lora.variant)")
    return loaded


def _copy(layer, module, where: str) -> None:
    variant = layer_variant(layer)
    expected = {"lora": LoraModule, "dora": LoraModule, "loha": LohaModule, "lokr": LokrModule}[variant]
    if not isinstance(module, expected) or (variant == "dora") != (getattr(module, "dora_scale", None) is not None):
        kind = "dora" if getattr(module, "dora_scale", None) is not None else module.kind
        raise ConfigError(f"{where} is {kind} in the file but {variant} in training; set lora.variant = {kind!r}")
    if variant in ("lora", "dora"):
        _copy_lora(layer, module, where)
    elif variant == "loha":
        ratio = (module.alpha / module.rank) / layer.scaling["default"]
        tensors = {"hada_w1_a": module.w1_a * ratio, "hada_w1_b": module.w1_b, "hada_w2_a": module.w2_a,
                   "hada_w2_b": module.w2_b}
        _assign(layer, tensors, where)
    else:
        tensors = dict(module.tensors)
        file_scale = module.alpha / module.rank if module.rank is not None else 1.0
        first = "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a"
        tensors[first] = tensors[first] * (file_scale / layer.scaling["default"])
        _assign(layer, tensors, where)


def _copy_lora(layer, module: LoraModule, where: str) -> None:
    down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    if down.shape != module.down.shape or up.shape != module.up.shape:
        raise ConfigError(f"{where} has rank {module.rank} in the file (shapes {tuple(module.down.shape)}, "
                          f"{tuple(module.up.shape)}); set lora.rank = {module.rank}")
    ratio = (module.alpha / module.rank) / layer.scaling["default"]
    down.copy_(module.down)
    up.copy_(module.up * ratio)
    if module.dora_scale is not None:
        magnitude = layer.lora_magnitude_vector["default"].weight
        if module.dora_scale.shape[0] != up.shape[0] or module.dora_scale.numel() != up.shape[0]:
            raise ConfigError(f"{where}: the file's DoRA scale is per input channel; peft's DoRA is per "
                              "output channel, so it cannot continue this file")
        magnitude.copy_(module.dora_scale.reshape(magnitude.shape))


def _assign(layer, tensors: dict[str, torch.Tensor], where: str) -> None:
    for key, value in tensors.items():
        params = getattr(layer, key)
        if "default" not in params or params["default"].shape != value.shape:
            have = {k: tuple(getattr(layer, k)["default"].shape) for k in tensors if "default" in getattr(layer, k)}
            raise ConfigError(f"{where}: the file's {key} {tuple(value.shape)} does not fit the adapter's "
                              f"{have}; use the file's lora.rank")
        params["default"].copy_(value)


def _te(name: str) -> str:
    return name if name.startswith("text_model.") else f"text_model.{name}"
