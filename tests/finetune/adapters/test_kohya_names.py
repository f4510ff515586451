"""Every key of a default-format LoRA is one that A1111/Forge/ComfyUI map for SDXL, on the full SDXL structure.

The reference naming is re-derived here independently of finetune.adapters.keys: ComfyUI names a UNet
LoRA module `lora_unet_` + the SGM weight key without `.weight`, dots to underscores; text encoders
`lora_te1_text_model_…` / `lora_te2_text_model_…`.
"""

from __future__ import annotations

import pytest
import torch

from finetune.adapters.inject import add_unet_adapter
from finetune.adapters.keys import kohya_name
from finetune.adapters.save import lora_layers
from finetune.config import LoraConfig
from finetune.models.configs import sdxl_unet_config
from finetune.models.sgm_keys import unet_state_dict_to_sgm

REFUSED = ("input_blocks_0_0", "time_embed", "label_emb", "out_0", "out_2")


@pytest.fixture(scope="module")
def sdxl_unet_meta():
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in sdxl_unet_config().items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def comfy_unet_names(unet) -> dict[str, tuple]:
    """lora name -> weight shape, from the SGM checkpoint keys (what ComfyUI's loader maps)."""
    sgm = unet_state_dict_to_sgm({k: v for k, v in unet.state_dict().items()}, dict(unet.config))
    return {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): tuple(v.shape)
            for k, v in sgm.items() if k.endswith(".weight")}


@pytest.mark.parametrize("targets", ["attn", "attn_ff", "locon"])
def test_every_unet_key_is_one_comfyui_maps_with_fitting_shapes(sdxl_unet_meta, targets):
    import copy

    unet = copy.deepcopy(sdxl_unet_meta)
    reference = comfy_unet_names(unet)
    add_unet_adapter(unet, LoraConfig(rank=8, alpha=8, targets=targets))
    names = {}
    for path, layer in lora_layers(unet):
        name = kohya_name("unet", path, dict(unet.config))
        down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        names[name] = (tuple(down.shape), tuple(up.shape))
    assert len(names) == len(list(lora_layers(unet)))  # each module named once
    assert set(names) <= set(reference), sorted(set(names) - set(reference))[:5]
    assert not any(name.removeprefix("lora_unet_").startswith(REFUSED) for name in names)
    for name, (down, up) in names.items():
        weight = reference[name]
        assert up[:2] == (weight[0], 8) and down[:2] == (8, weight[1])  # up (out, r), down (r, in): never transposed
    if targets == "attn":
        assert len(names) == 2 * 4 * (2 * (2 + 10) + 10 + 3 * (10 + 2))  # every attention projection of SDXL
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names


def test_text_encoder_names_keep_the_text_model_level():
    for component, path in (("te1", "encoder.layers.0.self_attn.q_proj"),
                            ("te2", "text_model.encoder.layers.31.mlp.fc2")):
        name = kohya_name(component, path)
        assert name.startswith(f"lora_{component}_text_model_encoder_layers_")
        assert "text_model_text_model" not in name
