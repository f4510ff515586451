"""Converting LoRA files between kohya keys (A1111/Forge/ComfyUI) and diffusers/PEFT keys, tensors untouched.

The diffusers/PEFT format has no per-module alpha key: like `save_lora_weights`, the alphas go into
the `lora_adapter_metadata` header (peft's lora_alpha, with an alpha_pattern entry for each module
whose alpha differs), which `load_lora_weights` reads. Tensors are never rescaled, so
kohya -> diffusers -> kohya gives back identical tensors and alphas.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from finetune.adapters.keys import COMPONENT_PREFIX, te_path
from finetune.adapters.modules import AdapterModule, LoraModule
from finetune.adapters.read import read_lora
from finetune.adapters.save import te_magnitude_key
from finetune.errors import ConfigError, ModelError
from finetune.io import atomic_file, check_output
from finetune.models.configs import sdxl_unet_config
from finetune.models.sgm_keys import unet_module_map

PEFT_PREFIX = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}
FORMATS = ("kohya", "diffusers")


def module_kohya_tensors(module: AdapterModule) -> dict[str, torch.Tensor]:
    """A read module's tensors under kohya/LyCORIS suffixes."""
    if isinstance(module, LoraModule):
        out = {"lora_down.weight": module.down, "lora_up.weight": module.up}
        if module.dora_scale is not None:
            out["dora_scale"] = module.dora_scale
    elif module.kind == "loha":
        out = {"hada_w1_a": module.w1_a, "hada_w1_b": module.w1_b, "hada_w2_a": module.w2_a, "hada_w2_b": module.w2_b}
    else:
        out = dict(module.tensors)
    return {**out, "alpha": torch.tensor(float(module.alpha))}


def kohya_tensors(modules: dict[tuple[str, str], AdapterModule], unet_config: dict) -> dict[str, torch.Tensor]:
    """kohya-named tensors for read modules (UNet paths mapped to SGM names)."""
    unet_paths = [p for c, p in modules if c == "unet"]
    sgm = unet_module_map(unet_config, unet_paths) if unet_paths else {}
    out = {}
    for (component, path), module in modules.items():
        name = sgm[path] if component == "unet" else te_path(path)
        key = COMPONENT_PREFIX[component] + name.replace(".", "_")
        for suffix, value in module_kohya_tensors(module).items():
            out[f"{key}.{suffix}"] = value.contiguous()
    return out


def peft_module_path(component: str, path: str) -> str:
    """The module path diffusers' own save gives with transformers 5: CLIPTextModel has no `text_model.` level."""
    return path.removeprefix("text_model.") if component == "te1" else path


def peft_tensors(modules: dict[tuple[str, str], AdapterModule]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers' keys, with rank/alpha per component in the `lora_adapter_metadata` header as it reads them."""
    out: dict[str, torch.Tensor] = {}
    by_component: dict[str, dict[str, LoraModule]] = {}
    for (component, path), module in modules.items():
        if not isinstance(module, LoraModule):
            raise ModelError(f"{component}:{path} is a {module.kind.upper()} module: the diffusers format holds "
                             "LoRA and DoRA only; keep it in the kohya format")
        name = f"{PEFT_PREFIX[component]}.{peft_module_path(component, path)}"
        out[f"{name}.lora_A.weight"] = module.down.contiguous()
        out[f"{name}.lora_B.weight"] = module.up.contiguous()
        if module.dora_scale is not None:
            out[te_magnitude_key(f"{name}.lora_magnitude_vector")] = _peft_magnitude(module, name)
        by_component.setdefault(component, {})[peft_module_path(component, path)] = module
    config = {}
    for component, members in by_component.items():
        config.update(_peft_config(PEFT_PREFIX[component], members))
    return out, {"lora_adapter_metadata": json.dumps(config, sort_keys=True)}


def _peft_magnitude(module: LoraModule, name: str) -> torch.Tensor:
    scale, out = module.dora_scale, module.up.shape[0]
    if scale.shape[0] != out or scale.numel() != out:
        raise ModelError(f"{name}: its DoRA scale is per input channel, which PEFT/diffusers cannot hold; "
                         "keep it in the kohya format")
    # peft stores (out,) for linear layers and (1, out, 1, 1) for convs.
    return scale.reshape(1, out, 1, 1).contiguous() if module.up.dim() == 4 else scale.reshape(out).contiguous()


def _peft_config(prefix: str, members: dict[str, LoraModule]) -> dict:
    """peft LoraConfig fields for one component: the commonest rank/alpha, patterns for the others."""
    rank = Counter(m.rank for m in members.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in members.values()).most_common(1)[0][0]
    # Exact module names as patterns: peft matches `(.*\.)?<pattern>$`, so escape the dots.
    config = {
        "r": rank, "lora_alpha": alpha, "target_modules": sorted(members),
        "rank_pattern": {re.escape(p): m.rank for p, m in members.items() if m.rank != rank},
        "alpha_pattern": {re.escape(p): m.alpha for p, m in members.items() if m.alpha != alpha},
        "use_dora": any(m.dora_scale is not None for m in members.values()),
        "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True, "use_rslora": False,
    }
    return {f"{prefix}.{k}": v for k, v in config.items()}


def convert_lora(src: Path, dst: Path, to: str, unet_config: dict | None = None, *, overwrite: bool = False) -> Path:
    """Write `src` (any supported naming) to `dst` with kohya or diffusers keys; metadata is carried over.

    Raises:
        ConfigError: `to` is not kohya/diffusers, `dst` is `src`, or `dst` exists without `overwrite`.
        ModelError: `src` is unreadable, has unknown keys, or holds modules the target format cannot.
    """
    if to not in FORMATS:
        raise ConfigError(f"--to {to}: choose kohya or diffusers")
    check_output(Path(dst), overwrite=overwrite, inputs=[Path(src)])
    lora = read_lora(Path(src), unet_config=unet_config)
    metadata = {k: v for k, v in lora.metadata.items() if k != "lora_adapter_metadata"}
    if to == "kohya":
        tensors = kohya_tensors(lora.modules, unet_config or lora.unet_config or sdxl_unet_config())
    else:
        tensors, extra = peft_tensors(lora.modules)
        metadata.update(extra)
    metadata["format"] = "pt"
    with atomic_file(Path(dst)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(dst)
