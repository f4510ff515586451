"""Max-norm regularization of LoRA updates (kohya's scale_weight_norms): a module whose change
‖scale · up @ down‖ grows past `max_norm` has both factors shrunk back onto that norm after the step."""

from __future__ import annotations

import torch

from finetune.adapters.save import lora_layers


def lora_delta_norm(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """‖scale · up @ down‖_F from r × r products (trace identity), without forming the (out, in) matrix."""
    down, up = down.float().flatten(1), up.float().flatten(1)  # (r, in·kh·kw), (out, r)
    return scale * ((up.T @ up) * (down @ down.T)).sum().clamp(min=0).sqrt()


@torch.no_grad()
def clamp_lora_norms(models, max_norm: float) -> tuple[int, float]:
    """Scale down every LoRA module of `models` whose change exceeds `max_norm`.

    Returns:
        (modules scaled, the largest norm found before scaling): the numbers kohya logs.
    """
    scaled, largest = 0, 0.0
    for model in models:
        for _, layer in lora_layers(model):
            down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            norm = float(lora_delta_norm(down, up, layer.scaling["default"]))
            largest = max(largest, norm)
            if norm > max_norm:
                factor = (max_norm / norm) ** 0.5  # split between the two factors
                down.mul_(factor)
                up.mul_(factor)
                scaled += 1
    return scaled, largest
