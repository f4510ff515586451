"""Converting LoRA files between kohya keys (A1111/Forge/ComfyUI) and diffusers/PEFT keys, tensors untouched."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from finetune.adapters.keys import COMPONENT_PREFIX, te_path
from finetune.adapters.read import LoraModule, read_lora
from finetune.io import atomic_file

PEFT_PREFIX = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}


def kohya_tensors(modules: dict[tuple[str, str], LoraModule], unet_config: dict) -> dict[str, torch.Tensor]:
    from finetune.models.sgm_keys import unet_module_map

    unet_paths = [p for c, p in modules if c == "unet"]
    sgm = unet_module_map(unet_config, unet_paths) if unet_paths else {}
    out = {}
    for (component, path), m in modules.items():
        name = sgm[path] if component == "unet" else te_path(path)
        key = COMPONENT_PREFIX[component] + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = m.down.contiguous()
        out[f"{key}.lora_up.weight"] = m.up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(m.alpha))
    return out


def peft_tensors(modules: dict[tuple[str, str], LoraModule]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers' keys, with rank/alpha per module in the `lora_adapter_metadata` header as it reads them."""
    out, config = {}, {}
    for (component, path), m in modules.items():
        prefix = PEFT_PREFIX[component]
        out[f"{prefix}.{path}.lora_A.weight"] = m.down.contiguous()
        out[f"{prefix}.{path}.lora_B.weight"] = m.up.contiguous()
        config.setdefault(f"{prefix}.target_modules", []).append(path)
        config.setdefault(f"{prefix}.r", m.rank)
        config.setdefault(f"{prefix}.lora_alpha", m.alpha)
        config.setdefault(f"{prefix}.rank_pattern", {})[path] = m.rank
        config.setdefault(f"{prefix}.alpha_pattern", {})[path] = m.alpha
    return out, {"lora_adapter_metadata": json.dumps(config)}


def convert_lora(src: Path, dst: Path, to: str, unet_config: dict | None = None) -> Path:
    """Write `src` (any supported naming) to `dst` with kohya or diffusers keys; metadata is carried over."""
    from safetensors.torch import save_file

    from finetune.models.configs import sdxl_unet_config

    lora = read_lora(Path(src), unet_config=unet_config)
    metadata = {k: v for k, v in lora.metadata.items() if k != "lora_adapter_metadata"}
    if to == "kohya":
        tensors = kohya_tensors(lora.modules, unet_config or sdxl_unet_config())
    elif to == "diffusers":
        tensors, extra = peft_tensors(lora.modules)
        metadata.update(extra)
    else:
        raise ValueError(f"--to must be kohya or diffusers, got {to!r}")
    with atomic_file(Path(dst)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(dst)
