"""An independent model of the LoRA names ComfyUI (and A1111/Forge, which agree for SDXL) accept.

Re-derived for the tests from how ComfyUI builds its key map, not from finetune's code:
- UNet: every `.weight` of the SGM UNet (`diffusion_model.<path>.weight`) is accepted as
  `lora_unet_<path with _>`. The SGM path of a diffusers weight follows ComfyUI's block walk:
  input block 0 is conv_in; each down level has `layers` blocks (resnet at .0, attention at .1)
  then a downsampler block `.0.op`; the middle block is resnet/attention/resnet; each up level has
  `layers + 1` blocks, the last of which also holds the upsampler after its resnet (and attention).
- CLIP: `lora_te1_text_model_encoder_layers_<i>_<q/k/v/out proj or mlp fc1/fc2>` for CLIP-L,
  `lora_te2_…` for OpenCLIP-G; nothing else of the text encoders.
"""

from __future__ import annotations

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
OUTSIDE_BLOCKS = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                  "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                  "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
CLIP_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def _block_table(config: dict) -> list[tuple[str, str]]:
    """(diffusers block prefix, SGM block prefix) pairs, walking the UNet as ComfyUI does."""
    layers = config["layers_per_block"]
    down, up = config["down_block_types"], config["up_block_types"]
    pairs = []
    sgm_index = 1  # input_blocks.0 is conv_in
    for level, kind in enumerate(down):
        for i in range(layers):
            pairs.append((f"down_blocks.{level}.resnets.{i}", f"input_blocks.{sgm_index}.0"))
            if kind.startswith("CrossAttn"):
                pairs.append((f"down_blocks.{level}.attentions.{i}", f"input_blocks.{sgm_index}.1"))
            sgm_index += 1
        pairs.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{sgm_index}.0.op"))
        sgm_index += 1
    pairs += [("mid_block.resnets.0", "middle_block.0"), ("mid_block.attentions.0", "middle_block.1"),
              ("mid_block.resnets.1", "middle_block.2")]
    sgm_index = 0
    for level, kind in enumerate(up):
        for i in range(layers + 1):
            slot = 1
            pairs.append((f"up_blocks.{level}.resnets.{i}", f"output_blocks.{sgm_index}.0"))
            if kind.startswith("CrossAttn"):
                pairs.append((f"up_blocks.{level}.attentions.{i}", f"output_blocks.{sgm_index}.1"))
                slot = 2
            if i == layers:
                pairs.append((f"up_blocks.{level}.upsamplers.0.conv", f"output_blocks.{sgm_index}.{slot}.conv"))
            sgm_index += 1
    return pairs


def sgm_weight_name(diffusers_key: str, config: dict) -> str | None:
    """SGM name of one diffusers UNet parameter, None if ComfyUI has none for it."""
    for name, sgm in OUTSIDE_BLOCKS.items():
        if diffusers_key.startswith(name + "."):
            return sgm + diffusers_key[len(name):]
    for block, sgm in sorted(_block_table(config), key=lambda p: -len(p[0])):
        if diffusers_key.startswith(block + "."):
            rest = diffusers_key[len(block) + 1:]
            if ".resnets." in block:
                layer, _, leaf = rest.partition(".")
                rest = f"{RESNET[layer]}.{leaf}"
            return f"{sgm}.{rest}"
    return None


def comfy_unet_lora_names(unet) -> dict[str, tuple[int, ...]]:
    """LoRA name -> shape of the weight it patches, for every weight ComfyUI maps on this UNet."""
    config = dict(unet.config)
    names = {}
    for key, param in unet.state_dict().items():
        if key.endswith(".weight") and "lora_" not in key and "base_layer" not in key:
            sgm = sgm_weight_name(key, config)
            if sgm is not None:
                names["lora_unet_" + sgm.removesuffix(".weight").replace(".", "_")] = tuple(param.shape)
    return names


def comfy_clip_lora_names(te1_layers: int, te2_layers: int) -> set[str]:
    names = set()
    for prefix, count in (("lora_te1_", te1_layers), ("lora_te2_", te2_layers)):
        for i in range(count):
            for module in CLIP_MODULES:
                names.add(f"{prefix}text_model_encoder_layers_{i}_{module.replace('.', '_')}")
    return names
