"""kohya <-> diffusers conversion round-trips bitwise; diffusers loads both; init_from reproduces a file."""

from __future__ import annotations

import pytest

import torch
from safetensors.torch import load_file

from finetune.adapters.convert import convert_lora
from finetune.adapters.inject import add_unet_adapter
from finetune.adapters.load import load_adapter_weights
from finetune.adapters.save import save_adapter
from finetune.config import LoraConfig
from finetune.models.tiny import build_tiny_pipeline


def trained_unet(seed=0):
    pipe = build_tiny_pipeline(seed=0)
    add_unet_adapter(pipe.unet, LoraConfig(rank=4, alpha=2.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return pipe


def unet_output(unet):
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    cond = {"encoder_hidden_states": torch.randn(1, 77, unet.config.cross_attention_dim, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(1, 64, generator=g),
                                  "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), **cond).sample


@pytest.mark.slow
def test_round_trip_is_bitwise_and_diffusers_loads_both_formats(tmp_path):
    pipe = trained_unet()
    expected = unet_output(pipe.unet)
    kohya = save_adapter(tmp_path / "k.safetensors", pipe.unet, metadata={"ss_network_dim": "4"})
    diffusers = convert_lora(kohya, tmp_path / "d.safetensors", to="diffusers")
    back = convert_lora(diffusers, tmp_path / "k2.safetensors", to="kohya")
    a, b = load_file(str(kohya)), load_file(str(back))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(float(a[k]) == 2.0 for k in a if k.endswith(".alpha"))
    direct = save_adapter(tmp_path / "p.safetensors", pipe.unet, fmt="diffusers")
    assert all(k.startswith("unet.") and ".lora_" in k for k in load_file(str(direct)))
    for path in (kohya, diffusers, direct):
        fresh = build_tiny_pipeline(seed=0)
        fresh.load_lora_weights(str(path))
        torch.testing.assert_close(unet_output(fresh.unet), expected, rtol=1e-4, atol=1e-5)


def test_init_from_reproduces_the_files_effect_with_another_alpha(tmp_path):
    pipe = trained_unet(seed=1)
    expected = unet_output(pipe.unet)
    path = save_adapter(tmp_path / "k.safetensors", pipe.unet)
    fresh = build_tiny_pipeline(seed=0)
    add_unet_adapter(fresh.unet, LoraConfig(rank=4, alpha=4.0))  # another scale: folded in on load
    assert load_adapter_weights(fresh.unet, None, path) > 0
    torch.testing.assert_close(unet_output(fresh.unet), expected, rtol=1e-4, atol=1e-5)
