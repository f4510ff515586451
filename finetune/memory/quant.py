"""Frozen UNet base weights in fewer bytes for LoRA training: NF4 (bitsandbytes) or fp8 with per-channel scales.

Only the Linear layers of the transformer blocks are quantized (on SDXL they hold 86% of the
UNet's weights); convs, time and add embeddings and norms keep their dtype. Call
`quantize_base_linears` before `finetune.adapters.inject.add_unet_adapter`: peft then wraps the
quantized layers like any other (its bitsandbytes 4-bit layer for NF4, its plain `Linear` for
`Float8Linear`, which is a `torch.nn.Linear`), and only the fp32 adapter trains.
"""

from __future__ import annotations

import logging
import re
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F

from finetune.adapters.inject import TRANSFORMER
from finetune.errors import ConfigError

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448: each output row's largest |w| is mapped here
# Every Linear of a Transformer2DModel: the module set of lora.targets = "attn_ff".
QUANTIZED_LINEARS = rf".*{TRANSFORMER}"


def quantize_base_linears(unet: torch.nn.Module, kind: Literal["nf4", "fp8"],
                          compute_dtype: torch.dtype = torch.bfloat16,
                          device: torch.device | str | None = None) -> int:
    """Replace, in place, the transformer blocks' Linear layers of `unet` with frozen quantized ones.

    Args:
        kind: "nf4" (bitsandbytes 4-bit NormalFloat, double-quantized statistics, blocks of 64)
            or "fp8" (`Float8Linear`: e4m3 weights, one scale per output channel).
        compute_dtype: the dtype weights are dequantized to when no autocast is active (under
            autocast fp8 follows the autocast dtype; NF4 always computes in this one).
        device: where each layer is quantized and then lives (default: where its weight is).
            Quantizing straight onto the GPU keeps the full-precision base off it.

    Returns:
        How many layers were replaced.

    Raises:
        ConfigError: kind = "nf4" and bitsandbytes is not installed.
        ValueError: adapters were added already (quantize first, so peft wraps the quantized layer).
    """
    if kind not in ("nf4", "fp8"):
        raise ValueError(f"kind must be 'nf4' or 'fp8', not {kind!r}")
    if any(hasattr(module, "base_layer") for module in unet.modules()):
        raise ValueError("quantize_base_linears must run before add_unet_adapter: the UNet has adapters already")
    bnb = _bitsandbytes() if kind == "nf4" else None
    # Names, not modules: each full-precision layer is dropped as soon as its quantized one replaces it,
    # so at most one of them sits on `device` at a time.
    targets = [name for name, module in unet.named_modules()
               if type(module) is torch.nn.Linear and re.fullmatch(QUANTIZED_LINEARS, name)]
    for name in targets:
        linear = unet.get_submodule(name)
        linear.requires_grad_(False)
        if device is not None:
            linear.to(device)  # one layer at a time: the full-precision base never sits on `device` whole
        if kind == "nf4":
            quantized = _nf4_linear(linear, compute_dtype, bnb)
        else:
            quantized = Float8Linear.from_linear(linear, compute_dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent_name), child, quantized)
        del linear, quantized
    if kind == "nf4" and targets:
        # peft picks its bitsandbytes 4-bit LoRA layer (4-bit aware merge, dtype handling) only when
        # the model says so; diffusers' own bitsandbytes loader sets the same flag.
        unet.is_loaded_in_4bit = True
    return len(targets)


def base_weight_nbytes(model: torch.nn.Module) -> int:
    """Bytes held by the frozen weights of `model`: untrained parameters, buffers, 4-bit statistics."""
    total = sum(b.nbytes for b in model.buffers())
    for param in model.parameters():
        if param.requires_grad:
            continue
        total += param.nbytes
        state = getattr(param, "quant_state", None)  # NF4: per-block absmax (itself quantized) and codebook
        if state is not None:
            total += sum(t.nbytes for t in state.as_dict(packed=True).values() if isinstance(t, torch.Tensor))
    return total


def logical_numel(param: torch.Tensor) -> int:
    """Weights a parameter stands for: an NF4 tensor packs two in each stored byte."""
    state = getattr(param, "quant_state", None)
    return state.shape.numel() if state is not None else param.numel()


def _bitsandbytes() -> ModuleType:
    # Its "Failed to load CPU gemm_4bit_forward" notice (CPUs with AVX512-BF16) is not for users.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes  # optional: only an nf4 base needs it
    except ImportError:
        raise ConfigError('memory.base_dtype = "nf4" needs bitsandbytes: pip install bitsandbytes') from None
    return bitsandbytes


def _nf4_linear(linear: torch.nn.Linear, compute_dtype: torch.dtype, bnb: ModuleType) -> torch.nn.Module:
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                              device="meta")  # no throwaway full-size init
    # Quantizing from compute_dtype makes that the dtype bnb dequantizes to: no transient fp32 weight.
    weight = linear.weight.detach().to(compute_dtype)
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                     module=layer).to(weight.device)  # moving to a device quantizes
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
    # On CPUs with AVX512-BF16, an eval-mode forward without grad repacks the weight for a faster
    # kernel, and that kernel has no backward: later training steps would get no gradient through
    # the layer (checked with bitsandbytes 0.50.2). Keep the layout that trains.
    layer.support_avx512bf16_for_cpu = False
    layer.train(linear.training)
    return layer


class Float8Linear(torch.nn.Linear):
    """A frozen Linear whose weight is stored in fp8 (e4m3) with one fp32 scale per output channel.

    `weight` is the fp8 Parameter (requires_grad=False) and `weight_scale` a (out_features, 1)
    buffer; the true weight is `weight * weight_scale`, rebuilt in the compute dtype on each call.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__(in_features, out_features, bias=bias, device="meta")  # filled by from_linear
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device),
                                         requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, 1, device=device))
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
        # peft creates the adapter in this dtype (it reads `compute_dtype`, as for bnb layers) rather
        # than in fp8; the toolkit then casts the adapter to fp32.
        self.compute_dtype = compute_dtype

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> Float8Linear:
        weight = linear.weight.detach().float()
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    compute_dtype=compute_dtype, device=weight.device)
        # Per-row absmax scaling: fp8's 3 mantissa bits then give ~3% RMS error wherever the row
        # sits, instead of small SDXL weights (~1e-2) falling into fp8's coarse subnormals.
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        layer.weight.data = (weight / scale).to(FP8)
        layer.weight_scale.copy_(scale)
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().clone()
        layer.train(linear.training)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # As nn.Linear under autocast: compute and answer in the autocast dtype.
            return _Fp8Matmul.apply(x.to(torch.get_autocast_dtype(device_type)), self.weight, self.weight_scale,
                                    self.bias)
        # No autocast: as bitsandbytes' Linear4bit, compute in compute_dtype, answer in the input's dtype.
        return _Fp8Matmul.apply(x.to(self.compute_dtype), self.weight, self.weight_scale, self.bias).to(x.dtype)

    def _apply(self, fn, recurse: bool = True):
        # Module.to(dtype) counts fp8 as a float and would upcast the weight (undoing the saving) and
        # round the scales to bf16. Integer tensors are moved but never cast, so both travel as
        # same-width integer views: `unet.to(torch.bfloat16)` may come before or after quantizing.
        stored = {id(self.weight), id(self.weight_scale)}

        def move_only(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in stored:
                return fn(t)
            as_int = {1: torch.uint8, 4: torch.int32}[t.element_size()]
            return fn(t.view(as_int)).view(t.dtype)

        return super()._apply(move_only, recurse)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8_e4m3 per-channel scale"


class _Fp8Matmul(torch.autograd.Function):
    """x @ (weight · scale)ᵀ + bias that saves the fp8 weight, not the dequantized one, for backward.

    A plain F.linear on the dequantized weight would keep a full-precision copy of every layer
    alive until backward: the whole bf16 base again. Dequantizing a second time is cheap.
    """

    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        ctx.save_for_backward(weight, scale)
        bias = None if bias is None else bias.to(x.dtype)
        return F.linear(x, _dequantize(weight, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale = ctx.saved_tensors
        # (..., out) @ (out, in) -> (..., in); the frozen weight, scale and bias get no gradient.
        return grad_out @ _dequantize(weight, scale, grad_out.dtype), None, None, None


def _dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.to(dtype) * scale.to(dtype)  # (out, in) * (out, 1)
