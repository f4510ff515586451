"""A refiner LoRA's keys are the ones ComfyUI maps for its SDXL-refiner model type, on the full refiner structure.

The reference (comfy_keys.py) walks the UNet as ComfyUI does, independently of finetune's key code; it
fits the refiner's four levels (attention at the middle two) as it fits the base's three. The full
refiner is built on the meta device: no memory, no weights.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from finetune.adapters.inject import add_unet_adapter
from finetune.adapters.keys import kohya_name
from finetune.adapters.save import adapter_layers, kohya_layer_tensors
from finetune.adapters.read import modules_from_tensors
from finetune.config import LoraConfig
from finetune.models.refiner import sdxl_refiner_unet_config


REFUSED = ("input_blocks_0_0", "time_embed", "label_emb", "out_0", "out_2")


def load_reference():
    spec = importlib.util.spec_from_file_location("comfy_keys", Path(__file__).with_name("comfy_keys.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


comfy = load_reference()


def file_entries(model) -> dict:
    """kohya name -> {suffix: shape} of what save_adapter writes for the UNet `model`."""
    entries = {}
    for path, layer in adapter_layers(model):
        name = kohya_name("unet", path, dict(model.config))
        assert name not in entries, f"{name} written twice"
        entries[name] = {suffix: tuple(t.shape) for suffix, t in kohya_layer_tensors(layer).items()}
    return entries


@pytest.fixture(scope="module")
def refiner_unet_meta():
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in sdxl_refiner_unet_config().items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def test_the_shipped_config_is_the_refiners(refiner_unet_meta):
    assert refiner_unet_meta.add_embedding.linear_1.in_features == 2560  # 1280 pooled + 5 x 256
    assert sum(p.numel() for p in refiner_unet_meta.parameters()) == pytest.approx(2.26e9, rel=0.01)


@pytest.mark.parametrize("targets", ["attn", "locon"])
def test_every_refiner_unet_key_is_one_comfyui_maps_with_fitting_shapes(refiner_unet_meta, targets):
    unet = copy.deepcopy(refiner_unet_meta)
    reference = comfy.comfy_unet_lora_names(unet)
    add_unet_adapter(unet, LoraConfig(rank=8, alpha=8, targets=targets))
    entries = file_entries(unet)
    assert set(entries) <= set(reference), sorted(set(entries) - set(reference))[:5]
    assert not any(name.removeprefix("lora_unet_").startswith(REFUSED) for name in entries)
    for name, shapes in entries.items():
        weight = reference[name]
        up, down = shapes["lora_up.weight"], shapes["lora_down.weight"]
        assert up[:2] == (weight[0], 8) and down[:2] == (8, weight[1]) and down[2:] == weight[2:]
    if targets == "attn":
        # q, k, v, out of attn1 and attn2 in 4 blocks of: 2 + 2 down, 1 mid, 3 + 3 up transformers.
        assert len(entries) == 2 * 4 * 4 * (2 + 2 + 1 + 3 + 3)
        # SGM paths of the refiner: its attention levels are input blocks 4-8 and output blocks 3-8.
        assert "lora_unet_input_blocks_4_1_transformer_blocks_3_attn2_to_k" in entries
        assert "lora_unet_output_blocks_8_1_transformer_blocks_0_attn1_to_q" in entries
        assert not any(n.startswith(("lora_unet_input_blocks_1_1", "lora_unet_output_blocks_9_1")) for n in entries)


def test_our_reader_decodes_refiner_names_only_with_the_refiner_layout():
    from finetune.adapters.read import default_unet_configs

    tensors = {"lora_unet_output_blocks_6_1_transformer_blocks_3_attn1_to_q.lora_down.weight": torch.zeros(4, 1536),
               "lora_unet_output_blocks_6_1_transformer_blocks_3_attn1_to_q.lora_up.weight": torch.zeros(1536, 4),
               "lora_unet_output_blocks_6_1_transformer_blocks_3_attn1_to_q.alpha": torch.tensor(4.0)}
    refiner_first = default_unet_configs({"modelspec.architecture": "stable-diffusion-xl-v1-refiner/lora"})[0]
    modules = modules_from_tensors(tensors, unet_config=refiner_first)
    assert list(modules) == [("unet", "up_blocks.2.attentions.0.transformer_blocks.3.attn1.to_q")]
