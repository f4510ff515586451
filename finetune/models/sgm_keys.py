"""Names of SDXL UNet modules in diffusers' layout and in SGM's (the original single-file layout).

kohya/A1111/ComfyUI LoRAs and single-file checkpoints name UNet modules the SGM way
(`input_blocks.4.1.transformer_blocks.0.attn1.to_q`); diffusers names the same module
`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`. The map is derived from the UNet
config (block count, layers per block, which blocks have attention), so it fits the real SDXL
and the tiny model alike.
"""

from __future__ import annotations

import torch

# diffusers is imported inside the function that uses it: the key tables need no model library.

# Inside a ResNet block the two layouts name the layers differently; everything inside a
# transformer block (attn1/attn2/ff/norm/proj_in/proj_out) has the same name in both.
RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def block_prefix_map(unet_config: dict) -> dict[str, str]:
    """Prefix of every diffusers block (resnet, attention, sampler) -> its SGM prefix.

    Example for SDXL: "down_blocks.1.attentions.0" -> "input_blocks.4.1".
    """
    layers = unet_config["layers_per_block"]
    down_types = unet_config["down_block_types"]
    up_types = unet_config["up_block_types"]
    out: dict[str, str] = {}

    # Down path: input_blocks.0 is conv_in, then `layers` blocks per level, then a downsampler
    # (its own input_blocks entry) after every level but the last.
    index = 1
    for level, block_type in enumerate(down_types):
        for j in range(layers):
            out[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{index}.0"
            if "CrossAttn" in block_type:
                out[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if level < len(down_types) - 1:
            out[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1

    out["mid_block.resnets.0"] = "middle_block.0"
    out["mid_block.attentions.0"] = "middle_block.1"
    out["mid_block.resnets.1"] = "middle_block.2"

    # Up path: `layers + 1` blocks per level; the upsampler sits inside the level's last block,
    # after its resnet (and attention, when there is one).
    index = 0
    for level, block_type in enumerate(up_types):
        has_attn = "CrossAttn" in block_type
        for j in range(layers + 1):
            out[f"up_blocks.{level}.resnets.{j}"] = f"output_blocks.{index}.0"
            if has_attn:
                out[f"up_blocks.{level}.attentions.{j}"] = f"output_blocks.{index}.1"
            index += 1
        if level < len(up_types) - 1:
            out[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{index - 1}.{2 if has_attn else 1}.conv"
    return out


def diffusers_to_sgm(module_path: str, prefixes: dict[str, str]) -> str | None:
    """SGM path of a diffusers UNet module path (or parameter name), None if it has no SGM twin."""
    for name, sgm in TOP_LEVEL.items():
        if module_path == name or module_path.startswith(name + "."):
            return sgm + module_path[len(name):]
    parts = module_path.split(".")
    # Block prefixes are 3 parts ("mid_block.resnets.0") or 4 ("down_blocks.1.attentions.0",
    # "down_blocks.0.downsamplers.0.conv" is 5); try the longest first.
    for size in (5, 4, 3):
        head = ".".join(parts[:size])
        if head in prefixes:
            rest = parts[size:]
            if ".resnets." in head and rest:
                inner = rest[0]
                rest = RESNET_RENAMES.get(inner, inner).split(".") + rest[1:]
            return ".".join([prefixes[head], *rest])
    return None


def unet_module_map(unet_config: dict, module_paths: list[str] | None = None) -> dict[str, str]:
    """Every diffusers UNet module path -> its SGM path.

    Args:
        unet_config: the UNet's config dict (diffusers `unet.config`).
        module_paths: the paths to map; default: every module with weights of a UNet built from
            the config on the meta device (no memory is allocated).
    """
    if module_paths is None:
        module_paths = weighted_module_paths(unet_config)
    prefixes = block_prefix_map(unet_config)
    mapped = {path: diffusers_to_sgm(path, prefixes) for path in module_paths}
    return {k: v for k, v in mapped.items() if v is not None}


def weighted_module_paths(unet_config: dict) -> list[str]:
    """Names of the UNet's modules that own parameters, from a weightless (meta) build."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return [name for name, module in unet.named_modules() if name and any(True for _ in module.parameters(recurse=False))]


def unet_state_dict_to_sgm(state_dict: dict, unet_config: dict) -> dict:
    """Rename a diffusers UNet state dict to SGM keys (without the `model.diffusion_model.` prefix)."""
    prefixes = block_prefix_map(unet_config)
    out = {}
    for key, tensor in state_dict.items():
        new = diffusers_to_sgm(key, prefixes)
        if new is None:
            raise KeyError(f"UNet weight {key} has no SGM name")
        out[new] = tensor
    return out


def unet_state_dict_from_sgm(state_dict: dict, unet_config: dict) -> dict:
    """Rename an SGM UNet state dict (no `model.diffusion_model.` prefix) to diffusers keys."""
    paths = unet_module_map(unet_config)
    reverse = {sgm: diff for diff, sgm in paths.items()}
    out = {}
    for key, tensor in state_dict.items():
        module, _, leaf = key.rpartition(".")
        if module not in reverse:
            raise KeyError(f"SGM UNet weight {key} has no diffusers name")
        out[f"{reverse[module]}.{leaf}"] = tensor
    return out
