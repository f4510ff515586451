"""Every key of a default-format LoRA is one that A1111/Forge/ComfyUI map for SDXL, on the full SDXL structure.

The reference naming (comfy_keys.py) is re-derived independently of finetune.adapters.keys and
finetune.models.sgm_keys. Full-size SDXL models are built on the meta device: no memory, no weights.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from finetune.adapters.inject import add_text_encoder_adapters, add_unet_adapter
from finetune.adapters.keys import kohya_name
from finetune.adapters.save import adapter_layers, kohya_layer_tensors
from finetune.config import LoraConfig
from finetune.models.configs import sdxl_text_configs, sdxl_unet_config

REFUSED = ("input_blocks_0_0", "time_embed", "label_emb", "out_0", "out_2")


def load_reference():
    path = Path(__file__).with_name("comfy_keys.py")
    spec = importlib.util.spec_from_file_location("comfy_keys", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


comfy = load_reference()


@pytest.fixture(scope="module")
def sdxl_unet_meta():
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in sdxl_unet_config().items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def file_entries(component, model, unet_config=None):
    """kohya name -> {suffix: shape} of what save_adapter would write for `model`."""
    entries = {}
    for path, layer in adapter_layers(model):
        name = kohya_name(component, path, unet_config)
        assert name not in entries, f"{name} written twice"
        entries[name] = {suffix: tuple(t.shape) for suffix, t in kohya_layer_tensors(layer).items()}
    return entries


@pytest.mark.parametrize("targets", ["attn", "attn_ff", "locon"])
def test_every_unet_key_is_one_comfyui_maps_with_fitting_shapes(sdxl_unet_meta, targets):
    unet = copy.deepcopy(sdxl_unet_meta)
    reference = comfy.comfy_unet_lora_names(unet)
    add_unet_adapter(unet, LoraConfig(rank=8, alpha=8, targets=targets))
    entries = file_entries("unet", unet, dict(unet.config))
    assert len(entries) == len(list(adapter_layers(unet)))  # each module named once
    assert set(entries) <= set(reference), sorted(set(entries) - set(reference))[:5]
    assert not any(name.removeprefix("lora_unet_").startswith(REFUSED) for name in entries)
    for name, shapes in entries.items():
        weight = reference[name]
        up, down = shapes["lora_up.weight"], shapes["lora_down.weight"]
        # up (out, r[, 1, 1]) and down (r, in[, kh, kw]): never transposed; convs keep their kernel on down
        assert up[:2] == (weight[0], 8) and down[:2] == (8, weight[1]) and down[2:] == weight[2:]
        assert all(s == 1 for s in up[2:]) and shapes["alpha"] == ()
    if targets == "attn":
        assert len(entries) == 2 * 4 * (2 * (2 + 10) + 10 + 3 * (10 + 2))  # every attention projection of SDXL
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in entries
    if targets == "locon":
        assert "lora_unet_input_blocks_3_0_op" in entries and "lora_unet_output_blocks_2_2_conv" in entries
        assert "lora_unet_input_blocks_4_0_skip_connection" in entries


@pytest.mark.parametrize("variant", ["dora", "loha", "lokr"])
def test_variant_keys_use_comfyui_and_lycoris_suffixes(sdxl_unet_meta, variant):
    unet = copy.deepcopy(sdxl_unet_meta)
    reference = comfy.comfy_unet_lora_names(unet)
    add_unet_adapter(unet, LoraConfig(rank=8, alpha=4, targets="attn", variant=variant,
                                      block_ranks={"mid_block": 4}))
    entries = file_entries("unet", unet, dict(unet.config))
    assert set(entries) <= set(reference)
    expected = {"dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
                "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}}
    for name, shapes in entries.items():
        out, inp = reference[name][:2]
        if variant in expected:
            assert set(shapes) == expected[variant]
        if variant == "dora":
            assert shapes["dora_scale"] == (out, 1)  # per output row: ComfyUI's output-axis layout
        elif variant == "loha":
            assert shapes["hada_w1_a"][0] == out and shapes["hada_w1_b"][1] == inp
        else:
            assert set(shapes) - {"alpha"} <= {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}


def test_text_encoder_keys_are_the_ones_comfyui_maps_for_sdxl():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    te1_config, te2_config = (CLIPTextConfig(**c) for c in sdxl_text_configs())
    with torch.device("meta"):
        encoders = (CLIPTextModel(te1_config), CLIPTextModelWithProjection(te2_config))
    add_text_encoder_adapters(encoders, LoraConfig(rank=4, alpha=4, targets="attn_ff"))
    names = set(file_entries("te1", encoders[0])) | set(file_entries("te2", encoders[1]))
    reference = comfy.comfy_clip_lora_names(te1_config.num_hidden_layers, te2_config.num_hidden_layers)
    assert names == reference  # all 6 modules of all 12 + 32 layers, each with `text_model`


def test_text_encoder_names_keep_one_text_model_level():
    for component, path in (("te1", "encoder.layers.0.self_attn.q_proj"),
                            ("te2", "text_model.encoder.layers.31.mlp.fc2")):
        name = kohya_name(component, path)
        assert name.startswith(f"lora_{component}_text_model_encoder_layers_")
        assert "text_model_text_model" not in name
