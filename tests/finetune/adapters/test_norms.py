"""LoRA max-norm: the change's norm from r × r products, and modules over the bound shrunk onto it."""

from __future__ import annotations

import pytest
import torch

from finetune.adapters.norms import clamp_lora_norms, lora_delta_norm
from finetune.adapters.save import lora_layers


@pytest.mark.parametrize("kernel", [(), (3, 3)])
def test_delta_norm_equals_the_norm_of_the_formed_matrix(kernel):
    g = torch.Generator().manual_seed(0)
    down = torch.randn(4, 6, *kernel, generator=g)
    up = torch.randn(5, 4, *(1 for _ in kernel), generator=g)
    formed = 0.5 * (up.flatten(1) @ down.flatten(1))
    assert lora_delta_norm(down, up, 0.5).item() == pytest.approx(formed.norm().item(), rel=1e-5)


def test_modules_over_the_bound_are_shrunk_onto_it_and_the_rest_untouched():
    from finetune.adapters.inject import add_unet_adapter
    from finetune.config import LoraConfig
    from finetune.models.tiny import build_tiny_pipeline

    unet = build_tiny_pipeline(seed=0).unet
    add_unet_adapter(unet, LoraConfig(rank=4, alpha=2.0))
    g = torch.Generator().manual_seed(1)
    layers = dict(lora_layers(unet))
    with torch.no_grad():
        for i, layer in enumerate(layers.values()):  # every other module big, the rest tiny
            layer.lora_A["default"].weight.copy_(torch.randn(layer.lora_A["default"].weight.shape, generator=g))
            layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=g)
                                                 * (1.0 if i % 2 == 0 else 1e-4))

    def norms():
        return {n: lora_delta_norm(l.lora_A["default"].weight, l.lora_B["default"].weight, l.scaling["default"]).item()
                for n, l in layers.items()}

    before = norms()
    small = {n: layers[n].lora_B["default"].weight.clone() for n, v in before.items() if v <= 1.0}
    scaled, largest = (t.item() for t in clamp_lora_norms(list(layers.values()), 1.0))
    after = norms()
    assert largest == pytest.approx(max(before.values()), rel=1e-5)
    assert scaled == sum(v > 1.0 for v in before.values()) > 0 and len(small) > 0
    assert all(after[n] == pytest.approx(1.0, rel=1e-4) for n, v in before.items() if v > 1.0)
    assert all(torch.equal(layers[n].lora_B["default"].weight, w) for n, w in small.items())
