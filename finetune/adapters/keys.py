"""LoRA key names: kohya's (what A1111/Forge and ComfyUI read for SDXL) <-> module paths in our models.

kohya names a module `lora_unet_<SGM path with _>` (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`)
or `lora_te{1,2}_text_model_<path with _>`. `_` is ambiguous (module names contain it), so names are
decoded by looking them up in a table built from the real module names of the architecture.
"""

from __future__ import annotations

import json
from functools import lru_cache

from finetune.models.sgm_keys import unet_module_map

COMPONENT_PREFIX = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}
# The text-encoder modules kohya, A1111 and ComfyUI name (per layer).
TEXT_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def te_path(module_path: str) -> str:
    """A text-encoder module path with exactly one `text_model.` level (transformers 5's CLIPTextModel has none)."""
    return module_path if module_path.startswith("text_model.") else f"text_model.{module_path}"


def kohya_name(component: str, module_path: str, unet_config: dict | None = None) -> str:
    """The kohya name of one module (UNet: diffusers path mapped to SGM)."""
    if component == "unet":
        sgm = unet_module_map(unet_config, [module_path])[module_path]
        return COMPONENT_PREFIX["unet"] + sgm.replace(".", "_")
    return COMPONENT_PREFIX[component] + te_path(module_path).replace(".", "_")


@lru_cache(maxsize=8)
def _unet_table(config_json: str) -> dict[str, str]:
    config = json.loads(config_json)
    table = {}
    for diffusers_path, sgm in unet_module_map(config).items():
        table["lora_unet_" + sgm.replace(".", "_")] = diffusers_path
        # kohya's older SDXL files (and OneTrainer's) use diffusers paths with `_`: read them too.
        table["lora_unet_" + diffusers_path.replace(".", "_")] = diffusers_path
    return table


def unet_name_table(unet_config: dict) -> dict[str, str]:
    """kohya UNet name (SGM or diffusers flavour) -> diffusers module path."""
    # Cached by the config's JSON text: building the table instantiates a (meta) UNet.
    config = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
    return _unet_table(json.dumps(config, sort_keys=True, default=str))


def text_name_table(component: str, num_layers: int) -> dict[str, str]:
    """kohya text-encoder name -> module path under `text_model.` (q/k/v/out projections, MLP)."""
    table = {}
    for layer in range(num_layers):
        for sub in TEXT_MODULES:
            path = f"text_model.encoder.layers.{layer}.{sub}"
            table[COMPONENT_PREFIX[component] + path.replace(".", "_")] = path
    return table
