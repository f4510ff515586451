"""A saved module's change to its weight, as read back, equals what peft applied in training (every variant).

The file side is also checked against the formulas ComfyUI/LyCORIS apply to these keys, written
out here: LoRA/LoHa scale alpha/rank, LoKr with two full factors no scale, DoRA per-output-row norm
of W + ΔW as LyCORIS defines it (ComfyUI/Forge's output-axis path divide by the norm of W alone,
which differs by ‖W + ΔW‖/‖W‖ per row: see finetune/adapters/save.py).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from finetune.adapters.inject import add_unet_adapter
from finetune.adapters.keys import kohya_name
from finetune.adapters.modules import LoraModule
from finetune.adapters.read import read_lora
from finetune.adapters.save import adapter_layers, save_adapter
from finetune.config import LoraConfig
from finetune.errors import ModelError
from finetune.models.tiny import build_tiny_pipeline


def trained_unet(variant, seed=0):
    unet = build_tiny_pipeline(seed=0).unet
    add_unet_adapter(unet, LoraConfig(rank=4, alpha=3.0, targets="locon", variant=variant))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g)
                p.copy_(p * (1 + 0.1 * noise) if "magnitude" in name else noise * 0.05)
    return unet


def peft_weight_change(layer) -> torch.Tensor:
    """What peft adds to the base weight when it merges this layer."""
    base = layer.get_base_layer().weight.detach().clone()
    layer.merge(adapter_names=["default"])
    merged = layer.get_base_layer().weight.detach().clone()
    layer.unmerge()
    return merged - base


def comfy_formula(tensors: dict, weight: torch.Tensor) -> torch.Tensor:
    """ComfyUI/LyCORIS' change for one module's file tensors (suffix -> tensor), written out independently."""
    alpha = tensors["alpha"].item()
    if "lora_down.weight" in tensors:
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        diff = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * alpha / down.shape[0]
        if "dora_scale" not in tensors:
            return diff
        combined = weight + diff
        rows = combined.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
        return combined * tensors["dora_scale"].reshape(rows.shape) / rows - weight
    if "hada_w1_a" in tensors:
        m1 = tensors["hada_w1_a"] @ tensors["hada_w1_b"]
        m2 = tensors["hada_w2_a"] @ tensors["hada_w2_b"]
        return (m1 * m2).reshape(weight.shape) * alpha / tensors["hada_w1_b"].shape[0]
    rank = None
    w1 = tensors.get("lokr_w1")
    if w1 is None:
        w1, rank = tensors["lokr_w1_a"] @ tensors["lokr_w1_b"], tensors["lokr_w1_b"].shape[0]
    w2 = tensors.get("lokr_w2")
    if w2 is None:
        w2, rank = tensors["lokr_w2_a"] @ tensors["lokr_w2_b"], tensors["lokr_w2_b"].shape[0]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).reshape(weight.shape) * (alpha / rank if rank else 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lora", "dora", "loha", "lokr"])
def test_read_module_and_comfyui_formula_reproduce_peft(tmp_path, variant):
    unet = trained_unet(variant)
    path = save_adapter(tmp_path / "a.safetensors", unet)
    modules = read_lora(path, unet_config=dict(unet.config)).modules
    tensors = load_file(str(path))
    layers = dict(adapter_layers(unet))
    assert modules.keys() == {("unet", name) for name in layers}
    kinds = set()
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight.detach()
        expected = peft_weight_change(layer)
        module = modules[("unet", name)]
        kinds.add(weight.dim())
        torch.testing.assert_close(module.delta(weight=weight), expected, rtol=1e-4, atol=1e-6)
        key = kohya_name("unet", name, dict(unet.config))
        own = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == key}
        torch.testing.assert_close(comfy_formula(own, weight), expected, rtol=1e-4, atol=1e-6)
    assert kinds == {2, 4}  # linear layers and convs (3x3 and 1x1) both covered


def test_delta_scales_and_shapes():
    down, up = torch.randn(2, 3, 3, 3), torch.randn(5, 2, 1, 1)
    module = LoraModule(down, up, alpha=1.0)
    delta = module.delta(scale=0.5)
    assert delta.shape == (5, 3, 3, 3) and delta.dtype == torch.float32
    expected = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * 0.5 * 1.0 / 2
    torch.testing.assert_close(delta, expected)
    half = LoraModule(down.half(), up.half(), alpha=2.0)
    assert half.delta().dtype == torch.float32  # computed in fp32 whatever the file's dtype
    dora = LoraModule(torch.randn(2, 4), torch.randn(6, 2), 2.0, dora_scale=torch.ones(6, 1))
    with pytest.raises(ModelError, match="weight"):
        dora.delta()
    weight = torch.randn(6, 4)
    merged = weight + dora.delta(weight=weight)
    torch.testing.assert_close(merged.norm(dim=1), torch.ones(6))  # each row rescaled to its magnitude
