"""How the UNet keeps its activations for backward: recomputed per block kind, or offloaded to CPU memory.

diffusers checkpoints at two levels: a down/mid/up block's flag recomputes its ResNets, and each
`Transformer2DModel`'s flag recomputes its transformer blocks. Choosing which flags to set trades
memory for recompute without touching diffusers' code:

- `full`: both (diffusers' `enable_gradient_checkpointing`): least memory, one extra forward.
- `transformer`: transformer blocks only; SDXL's 10-block transformers at 32² and 2-block ones at
  64² latents hold most of the activations, while the cheap-to-store ResNets keep theirs.
- `resnet`: ResNets only (they dominate at the 128² latent level, which has no attention in SDXL).
- `offload`: recompute nothing; every saved activation moves to pinned CPU memory during forward and
  comes back in backward (`torch.autograd.graph.save_on_cpu`): GPU memory of `full`, host memory
  and PCIe traffic instead of recompute.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

CheckpointingMode = Literal["full", "transformer", "resnet", "offload"]


def enable_checkpointing(unet, mode: CheckpointingMode) -> None:
    """Set the UNet's checkpointing flags for `mode` ("offload" sets none: see `saved_activations`)."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    if mode == "offload":
        return
    unet.enable_gradient_checkpointing()  # installs the (non-reentrant) checkpoint function everywhere
    if mode == "full":
        return
    for module in unet.modules():
        if hasattr(module, "gradient_checkpointing"):
            is_transformer = isinstance(module, Transformer2DModel)
            module.gradient_checkpointing = is_transformer if mode == "transformer" else not is_transformer


def checkpointed_modules(unet) -> list[str]:
    """Names of the modules whose checkpointing flag is on (for tests and the run plan)."""
    return [name for name, module in unet.named_modules() if getattr(module, "gradient_checkpointing", False)]


def saved_activations(enabled: bool, mode: CheckpointingMode, device: torch.device):
    """The context the forward pass runs in: offloads saved tensors to CPU for `offload`, else nothing."""
    if enabled and mode == "offload":
        # Pinned host memory lets the copies back overlap with backward's compute.
        return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
    return contextlib.nullcontext()
