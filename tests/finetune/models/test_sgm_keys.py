"""finetune.models.sgm_keys against an independent re-derivation of ComfyUI's diffusers -> SGM UNet names."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from finetune.models.configs import sdxl_unet_config
from finetune.models.sgm_keys import (unet_module_map, unet_state_dict_from_sgm, unet_state_dict_to_sgm,
                                      weighted_module_paths)
from finetune.models.tiny import tiny_unet_config


def load_reference():
    path = Path(__file__).parents[1] / "adapters" / "comfy_keys.py"
    spec = importlib.util.spec_from_file_location("comfy_keys", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


comfy = load_reference()


def meta_unet(config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})


@pytest.mark.parametrize("name", ["sdxl", "tiny"])
def test_every_unet_weight_maps_to_the_sgm_name_comfyui_uses(name):
    config = sdxl_unet_config() if name == "sdxl" else tiny_unet_config()
    unet = meta_unet(config)
    state = unet.state_dict()
    sgm = unet_state_dict_to_sgm(state, dict(unet.config))
    expected = {comfy.sgm_weight_name(k, dict(unet.config)) for k in state}
    assert None not in expected
    assert set(sgm) == expected and len(sgm) == len(state)  # one SGM name per weight, none shared
    modules = unet_module_map(dict(unet.config))
    assert set(modules) == set(weighted_module_paths(dict(unet.config)))
    for path, sgm_path in modules.items():
        key = f"{path}.weight" if f"{path}.weight" in state else next(k for k in state if k.startswith(path + "."))
        assert comfy.sgm_weight_name(key, dict(unet.config)).startswith(sgm_path + ".")


def test_known_sdxl_names():
    modules = unet_module_map(sdxl_unet_config())
    assert modules["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert modules["down_blocks.0.downsamplers.0.conv"] == "input_blocks.3.0.op"
    assert modules["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.2.conv"
    assert modules["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"
    assert modules["mid_block.resnets.1.conv2"] == "middle_block.2.out_layers.3"
    assert modules["down_blocks.1.resnets.0.conv_shortcut"] == "input_blocks.4.0.skip_connection"
    assert modules["add_embedding.linear_1"] == "label_emb.0.0"


def test_state_dict_round_trip_and_unknown_keys():
    config = tiny_unet_config()
    state = {k: torch.zeros(1) for k in meta_unet(config).state_dict()}
    assert unet_state_dict_from_sgm(unet_state_dict_to_sgm(state, config), config).keys() == state.keys()
    with pytest.raises(KeyError, match="no SGM name"):
        unet_state_dict_to_sgm({"not_a_block.weight": torch.zeros(1)}, config)
    with pytest.raises(KeyError, match="no diffusers name"):
        unet_state_dict_from_sgm({"input_blocks.99.0.weight": torch.zeros(1)}, config)
