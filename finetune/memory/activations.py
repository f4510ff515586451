"""How the UNet keeps its activations for backward: recomputed per block kind, or offloaded to CPU memory.

diffusers checkpoints at two levels: a down/mid/up block's flag recomputes its ResNets, and each
`Transformer2DModel`'s flag recomputes its transformer blocks. Choosing which flags to set trades
memory for recompute without touching diffusers' code:

- `full`: both (diffusers' `enable_gradient_checkpointing`): least memory, one extra forward.
- `transformer`: transformer blocks only; SDXL's 10-block transformers at 32² and 2-block ones at
  64² latents hold most of the activations, while the cheap-to-store ResNets keep theirs.
- `resnet`: ResNets only (they dominate at the 128² latent level, which has no attention in SDXL).
- `offload`: recompute nothing; every saved activation (not the weights) moves to pinned CPU memory
  during forward and comes back in backward: about the GPU memory of `full`, with host memory and
  PCIe traffic instead of recompute.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

# diffusers is imported where its transformer blocks are looked up: importing it takes seconds.

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
    """Names of the modules whose checkpointing flag is on."""
    return [name for name, module in unet.named_modules() if getattr(module, "gradient_checkpointing", False)]


def saved_activations(enabled: bool, mode: CheckpointingMode, device: torch.device, model=None):
    """The context the forward pass runs in: offloads saved activations to CPU for `offload`, else nothing.

    Tensors that share storage with `model`'s parameters (autograd saves the weights for the input
    gradient) stay where they are: they are on the GPU anyway, and copying them would move the
    whole base model over PCIe twice a step.
    """
    if enabled and mode == "offload":
        weights = set() if model is None else {p.untyped_storage().data_ptr() for p in model.parameters()}
        return _OffloadToCpu(weights, pin_memory=device.type == "cuda")
    return contextlib.nullcontext()


class _OffloadToCpu(torch.autograd.graph.saved_tensors_hooks):
    """Saved activations go to (pinned) host memory in forward and come back in backward."""

    def __init__(self, weight_storages: set[int], pin_memory: bool) -> None:
        self.weight_storages = weight_storages

        def pack(tensor: torch.Tensor):
            if tensor.device.type == "cpu" or tensor.untyped_storage().data_ptr() in weight_storages:
                return None, tensor
            # Pinned host memory lets the copy back overlap with backward's compute.
            host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pin_memory)
            host.copy_(tensor, non_blocking=pin_memory)
            return tensor.device, host

        def unpack(packed):
            device, tensor = packed
            return tensor if device is None else tensor.to(device, non_blocking=pin_memory)

        super().__init__(pack, unpack)
