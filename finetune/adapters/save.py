"""Writing a trained adapter: kohya keys by default, diffusers/PEFT keys on request; atomic, with metadata."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from finetune.adapters.keys import kohya_name
from finetune.io import atomic_file

TE_COMPONENTS = ("te1", "te2")


def lora_layers(model) -> Iterator[tuple[str, object]]:
    """(module path, peft LoRA layer) for every adapted module of `model`."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            yield name, module


def kohya_state_dict(unet, text_encoders=None) -> dict[str, torch.Tensor]:
    """`lora_unet_…/lora_te1_…/lora_te2_…` + `.lora_down.weight` (rank, in), `.lora_up.weight` (out, rank), `.alpha`."""
    state: dict[str, torch.Tensor] = {}
    parts = [("unet", unet)] + list(zip(TE_COMPONENTS, text_encoders or ()))
    unet_config = dict(unet.config)
    for component, model in parts:
        for path, layer in lora_layers(model):
            if layer.use_dora.get("default"):
                raise ValueError("DoRA adapters are written with lora.format = 'diffusers' (PEFT keys)")
            key = kohya_name(component, path, unet_config)
            state[f"{key}.lora_down.weight"] = layer.lora_A["default"].weight.detach().float().cpu().contiguous()
            state[f"{key}.lora_up.weight"] = layer.lora_B["default"].weight.detach().float().cpu().contiguous()
            state[f"{key}.alpha"] = torch.tensor(float(layer.lora_alpha["default"]))
    return state


def diffusers_state_dict(unet, text_encoders=None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The keys `StableDiffusionXLPipeline.save_lora_weights` writes, and its adapter-config metadata."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from peft.utils import get_peft_model_state_dict

    state, configs = {}, {}
    parts = [("unet", unet)] + list(zip(("text_encoder", "text_encoder_2"), text_encoders or ()))
    for prefix, model in parts:
        for key, value in get_peft_model_state_dict(model).items():
            state[f"{prefix}.{key}"] = value.detach().float().cpu().contiguous()
        for key, value in model.peft_config["default"].to_dict().items():
            configs[f"{prefix}.{key}"] = sorted(value) if isinstance(value, set) else value
    return state, {LORA_ADAPTER_METADATA_KEY: json.dumps(configs, default=str)}


def save_adapter(path: Path, unet, text_encoders=None, *, fmt: str = "kohya",
                 metadata: dict[str, str] | None = None) -> Path:
    """Write the adapter of `unet` (and of the text encoders, if given) to `path`, atomically."""
    from safetensors.torch import save_file

    metadata = dict(metadata or {})
    if fmt == "kohya":
        state = kohya_state_dict(unet, text_encoders)
    elif fmt == "diffusers":
        state, extra = diffusers_state_dict(unet, text_encoders)
        metadata.update(extra)
    else:
        raise ValueError(f"unknown adapter format {fmt!r} (kohya or diffusers)")
    metadata["format"] = "pt"
    with atomic_file(Path(path)) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return Path(path)
