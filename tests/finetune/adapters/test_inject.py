"""Adapter injection: target presets, per-block ranks, DoRA/LoHa/LoKr, text encoders."""

from __future__ import annotations

import pytest

from finetune.adapters.inject import add_text_encoder_adapters, add_unet_adapter
from finetune.adapters.save import adapter_layers, layer_variant, lora_layers
from finetune.config import LoraConfig
from finetune.errors import ConfigError
from finetune.models.tiny import build_tiny_pipeline


def layer_names(model):
    return [name for name, _ in lora_layers(model)]


def test_presets_grow_attn_to_locon_and_never_touch_refused_modules():
    counts = {}
    for targets in ("attn", "attn_ff", "locon"):
        unet = build_tiny_pipeline().unet
        add_unet_adapter(unet, LoraConfig(rank=2, alpha=2, targets=targets))
        names = layer_names(unet)
        counts[targets] = len(names)
        assert not any(n.startswith(("conv_in", "conv_out", "time_embedding", "add_embedding")) for n in names)
        trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
    assert counts["attn"] < counts["attn_ff"] < counts["locon"]


def test_block_ranks_and_dora():
    unet = build_tiny_pipeline().unet
    add_unet_adapter(unet, LoraConfig(rank=4, alpha=4, block_ranks={"down_blocks.1": 2}, variant="dora"))
    ranks = {name: layer.r["default"] for name, layer in lora_layers(unet)}
    assert all(r == 2 for n, r in ranks.items() if n.startswith("down_blocks.1."))
    assert all(r == 4 for n, r in ranks.items() if not n.startswith("down_blocks.1."))
    assert all(layer.use_dora["default"] for _, layer in lora_layers(unet))


def test_text_encoder_adapters():
    pipe = build_tiny_pipeline()
    add_text_encoder_adapters((pipe.text_encoder, pipe.text_encoder_2), LoraConfig(rank=2, alpha=2))
    assert all(n.endswith(("q_proj", "k_proj", "v_proj", "out_proj")) for n in layer_names(pipe.text_encoder))
    assert layer_names(pipe.text_encoder_2)


@pytest.mark.parametrize("variant", ["loha", "lokr"])
def test_loha_and_lokr_inject_with_only_their_factors_trainable(variant):
    unet = build_tiny_pipeline().unet
    add_unet_adapter(unet, LoraConfig(rank=2, alpha=2, variant=variant, targets="locon"))
    names = [name for name, _ in adapter_layers(unet)]
    assert names and all(layer_variant(layer) == variant for _, layer in adapter_layers(unet))
    assert any(".resnets." in n for n in names)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    prefix = "hada_" if variant == "loha" else "lokr_"
    assert trainable and all(prefix in n for n in trainable)


def test_block_ranks_prefix_that_matches_nothing_is_refused():
    unet = build_tiny_pipeline().unet
    with pytest.raises(ConfigError, match="down_block.1"):
        add_unet_adapter(unet, LoraConfig(rank=2, block_ranks={"down_block.1": 1}))
    # "mid_block" pins to the start of the path: no up/down block module picks up its rank.
    add_unet_adapter(unet, LoraConfig(rank=4, alpha=4, block_ranks={"mid_block": 2}))
    ranks = {name: layer.r["default"] for name, layer in lora_layers(unet)}
    assert {r for n, r in ranks.items() if n.startswith("mid_block.")} == {2}
    assert {r for n, r in ranks.items() if not n.startswith("mid_block.")} == {4}
