"""Max-norm regularization of LoRA updates (kohya's scale_weight_norms): a module whose change
‖scale · up @ down‖ grows past `max_norm` has both factors shrunk back onto that norm after the step."""

from __future__ import annotations

import torch


def lora_delta_norm(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """‖scale · up @ down‖_F from r × r products (trace identity), without forming the (out, in) matrix."""
    down, up = down.float().flatten(1), up.float().flatten(1)  # (r, in·kh·kw), (out, r)
    return scale * ((up.T @ up) * (down @ down.T)).sum().clamp(min=0).sqrt()


@torch.no_grad()
def clamp_lora_norms(layers, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale down every peft LoRA layer in `layers` (see adapters.save.lora_layers) whose change exceeds `max_norm`.

    Runs every step, so nothing here waits on the GPU: modules within the bound are multiplied
    by exactly 1 instead of being tested on the host.

    Returns:
        (modules scaled, the largest norm found before scaling) as 0-d tensors: what kohya logs.
    """
    norms = []
    for layer in layers:
        down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        norm = lora_delta_norm(down, up, layer.scaling["default"])
        factor = (max_norm / norm.clamp(min=max_norm)).sqrt()  # split between the two factors; 1 within
        down.mul_(factor)
        up.mul_(factor)
        norms.append(norm)
    if not norms:
        return torch.zeros((), dtype=torch.long), torch.zeros(())
    norms = torch.stack(norms)
    return (norms > max_norm).sum(), norms.max()
