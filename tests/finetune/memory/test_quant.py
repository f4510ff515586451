"""NF4 and fp8 frozen base weights: what is replaced, how close it computes, that LoRA trains on it, the bytes saved."""

from __future__ import annotations

import logging
import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F

from finetune.adapters.inject import add_unet_adapter
from finetune.adapters.save import save_adapter
from finetune.config import LoraConfig
from finetune.errors import ConfigError
from finetune.config import QUANTIZED_BASE_VARIANTS as ADAPTER_VARIANTS
from finetune.memory.quant import FP8, Float8Linear, base_weight_nbytes, quantize_base_linears

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU-kernel notice is noise here

KINDS = ["fp8", "nf4"]


def tiny_unet(dtype=torch.bfloat16):
    """The tiny SDXL UNet (only the UNet: the VAE and text encoders are not needed), frozen, in `dtype`."""
    from diffusers import UNet2DConditionModel

    from finetune.models.tiny import tiny_unet_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config())
    unet.requires_grad_(False)
    return unet.to(dtype)


def batch(seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(1, 4, 16, 16, generator=g),  # (B, 4, H/8, W/8)
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 77, 96, generator=g),  # te1 32 + te2 64 channels
        "added_cond_kwargs": {"text_embeds": torch.randn(1, 64, generator=g),
                              "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]])},
    }


def predict(unet, inputs) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return unet(**inputs).sample.float()


def transformer_linear_names(unet) -> set[str]:
    """Independently of the module's regex: every nn.Linear inside a Transformer2DModel (`…attentions.N…`)."""
    return {name for name, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and re.search(r"(^|\.)attentions\.\d+\.", name)}


def quantized_type(kind):
    if kind == "fp8":
        return Float8Linear
    import bitsandbytes

    return bitsandbytes.nn.Linear4bit


def dequantized(layer) -> torch.Tensor:
    """The weight a quantized layer stands for, rebuilt from what it stores."""
    if isinstance(layer, Float8Linear):
        return layer.weight.float() * layer.weight_scale
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


def one_layer_holder(linear: torch.nn.Linear) -> torch.nn.Module:
    """A module in which `linear` sits where quantize_base_linears looks for it."""
    holder = torch.nn.Module()
    holder.attentions = torch.nn.ModuleList([torch.nn.Module()])
    holder.attentions[0].proj_in = linear
    return holder


@pytest.mark.parametrize("kind", KINDS)
def test_every_transformer_linear_is_replaced_and_nothing_else(kind):
    unet = tiny_unet()
    expected = transformer_linear_names(unet)
    before = dict(unet.named_modules())
    assert quantize_base_linears(unet, kind) == len(expected) == 192
    after = dict(unet.named_modules())
    assert {n for n, m in after.items() if isinstance(m, quantized_type(kind))} == expected
    # Convs, norms, time and add embeddings (every module but the replaced ones) are the very same objects.
    assert all(after[n] is module for n, module in before.items() if n not in expected)
    assert isinstance(after["conv_in"], torch.nn.Conv2d) and after["conv_in"].weight.dtype == torch.bfloat16
    assert type(after["time_embedding.linear_1"]) is torch.nn.Linear
    assert type(after["add_embedding.linear_1"]) is torch.nn.Linear
    assert type(after["down_blocks.1.resnets.0.time_emb_proj"]) is torch.nn.Linear
    assert not any(p.requires_grad for p in unet.parameters())


@pytest.mark.parametrize("kind, bound", [("fp8", 0.04), ("nf4", 0.13)])
def test_quantized_layer_output_is_close_to_the_full_precision_one(kind, bound):
    """Output error vs fp32 on trained-like weights (normal, std 0.02), under bf16 autocast.

    Measured: bf16 0.29%, fp8 2.5-2.7%, NF4 9.1-9.3% (11% with heavy-tailed t(4) weights).
    The expected sizes: fp8 e4m3 keeps 3 mantissa bits, a relative rounding step of 2^-3 and an RMS
    error of about 2^-3/sqrt(12)/1.4 = 2.6%; NF4's 16 levels across a 64-weight block's range
    (about ±2.4σ) give an RMS error near 0.09σ. The bounds leave ~40% headroom.
    """
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(640, 640)  # SDXL's width at down_blocks.1
    with torch.no_grad():
        linear.weight.normal_(0, 0.02, generator=g)
    x = torch.randn(64, 640, generator=g)
    reference = linear(x).detach()
    holder = one_layer_holder(torch.nn.Linear(640, 640))
    holder.attentions[0].proj_in.load_state_dict(linear.state_dict())
    quantize_base_linears(holder, kind)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = holder.attentions[0].proj_in(x).float()
    error = ((out - reference).norm() / reference.norm()).item()
    assert 0.005 < error < bound  # above bf16's own error: the layer really is quantized


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_layer_computes_with_exactly_its_stored_weight(kind):
    linear = torch.nn.Linear(96, 48)
    holder = one_layer_holder(linear)
    quantize_base_linears(holder, kind, compute_dtype=torch.float32)  # fp32: no rounding on top
    layer = holder.attentions[0].proj_in
    x = torch.randn(5, 96)
    torch.testing.assert_close(layer(x), F.linear(x, dequantized(layer), linear.bias), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kind, bound", [("fp8", 0.05), ("nf4", 0.16)])
def test_unet_prediction_stays_close_to_the_bf16_base(kind, bound):
    """Whole tiny UNet, random weights, bf16 autocast. Measured: fp8 2.8%, NF4 10.4% off the bf16 base."""
    inputs = batch()
    reference = predict(tiny_unet().eval(), inputs)
    unet = tiny_unet().eval()
    quantize_base_linears(unet, kind)
    error = ((predict(unet, inputs) - reference).norm() / reference.norm()).item()
    assert error < bound


def test_fp8_backward_is_the_dequantized_linears_and_keeps_no_full_precision_weight():
    linear = torch.nn.Linear(64, 32)
    layer = Float8Linear.from_linear(linear, compute_dtype=torch.float32)
    x = torch.randn(3, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    out.pow(2).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, dequantized(layer), linear.bias).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert layer.weight.grad is None and layer.bias.grad is None
    # Backward holds the 1-byte weight, never a (32, 64) float copy of it.
    assert ((32, 64), FP8) in saved
    assert not any(shape == (32, 64) and dtype != FP8 for shape, dtype in saved)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_lora_on_the_quantized_base_trains_the_adapter_only(kind):
    unet = tiny_unet()
    names = transformer_linear_names(unet)
    quantize_base_linears(unet, kind)
    add_unet_adapter(unet, LoraConfig(rank=4, alpha=4.0, targets="attn_ff"))
    named = dict(unet.named_parameters())
    trained = {n: p for n, p in named.items() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert all(p.dtype == torch.float32 for p in trained.values())
    # peft wrapped every quantized layer, with its bitsandbytes-aware LoRA layer for NF4.
    from peft.tuners import lora

    wrapper = lora.bnb.Linear4bit if kind == "nf4" else lora.Linear
    for name in names:
        assert type(unet.get_submodule(name)) is wrapper
        assert isinstance(unet.get_submodule(name).base_layer, quantized_type(kind))
    frozen = {n: p.detach().clone() for n, p in named.items() if not p.requires_grad}

    inputs = batch()
    target = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(list(trained.values()), lr=1e-2)
    lora_b = [p for n, p in trained.items() if "lora_B" in n]
    losses = []
    for _ in range(6):
        loss = F.mse_loss(predict(unet, inputs), target)
        loss.backward()
        if not losses:  # lora_B starts at zero; its gradient is what moves it
            assert all(p.grad is not None for p in lora_b)
            assert sum(p.grad.abs().sum().item() for p in lora_b) > 0
        optimizer.step()
        optimizer.zero_grad()
        if not losses:
            assert any(p.abs().sum().item() > 0 for p in lora_b)
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses  # measured: 1.114 -> ~0.97 in 6 steps
    assert all(torch.equal(named[n], before) for n, before in frozen.items())


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", ["lora", "dora", "loha", "lokr"])
def test_adapter_variant_table(kind, variant):
    """ADAPTER_VARIANTS says which lora.variant peft trains on each base; the others fail loudly."""
    unet = tiny_unet()
    quantize_base_linears(unet, kind)
    cfg = LoraConfig(rank=4, alpha=4.0, targets="attn_ff", variant=variant)
    if variant not in ADAPTER_VARIANTS[kind]:
        with pytest.raises(RuntimeError):  # on injection (DoRA's weight norm) or the first forward
            add_unet_adapter(unet, cfg)
            predict(unet, batch())
        return
    add_unet_adapter(unet, cfg)
    predict(unet, batch()).pow(2).mean().backward()
    grads = [p.grad for p in unet.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def lora_grads(unet, inputs) -> dict[str, torch.Tensor]:
    unet.zero_grad()
    predict(unet, inputs).pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


def adapted(kind, seed=0):
    """Quantized tiny UNet + LoRA with non-zero lora_B, so lora_A gets gradients too."""
    unet = tiny_unet()
    quantize_base_linears(unet, kind)
    add_unet_adapter(unet, LoraConfig(rank=4, alpha=4.0, targets="attn_ff"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return unet.train()


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_sampling_in_eval_mode_and_checkpointing_leave_the_gradients_unchanged(kind):
    """bitsandbytes repacks a 4-bit weight on an eval-mode forward (AVX512-BF16 CPUs) into a layout
    with no backward; quantize_base_linears turns that off. Checkpointing must not change grads either."""
    inputs = batch()
    reference = lora_grads(adapted(kind), inputs)
    assert any(g.abs().sum() > 0 for n, g in reference.items() if "lora_A" in n)

    unet = adapted(kind).eval()
    with torch.no_grad():
        predict(unet, inputs)  # what rendering samples during training does
    after_eval = lora_grads(unet.train(), inputs)
    checkpointed = adapted(kind)
    checkpointed.enable_gradient_checkpointing()
    for grads in (after_eval, lora_grads(checkpointed, inputs)):
        assert grads.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(grads[name], reference[name], rtol=1e-3, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_casting_the_unet_afterwards_keeps_the_base_quantized(kind):
    unet = tiny_unet(torch.float32)
    quantize_base_linears(unet, kind)
    nbytes, out = base_weight_nbytes(unet), predict(unet.eval(), batch())
    unet.to(torch.bfloat16)  # what prepare_unet does for the rest of the model
    layer = unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_q")
    if kind == "fp8":
        assert layer.weight.dtype == FP8 and layer.weight_scale.dtype == torch.float32
    else:
        assert layer.weight.dtype == torch.uint8
    assert unet.conv_in.weight.dtype == torch.bfloat16
    # Only the unquantized fp32 rest halves; the quantized weights and their statistics are as they were.
    rest = sum(p.nbytes for n, p in unet.named_parameters() if n not in _quantized_param_names(unet, kind))
    assert base_weight_nbytes(unet) == nbytes - rest
    torch.testing.assert_close(predict(unet, batch()), out, rtol=0.05, atol=0.02)


def _quantized_param_names(unet, kind) -> set[str]:
    names = {n for n, m in unet.named_modules() if isinstance(m, quantized_type(kind))}
    return {f"{n}.weight" for n in names}


@pytest.mark.parametrize("kind", KINDS)
def test_base_weight_bytes_shrink(kind):
    unet = tiny_unet()
    names = transformer_linear_names(unet)
    bf16 = sum(base_weight_nbytes(unet.get_submodule(n)) for n in names)
    whole_bf16 = base_weight_nbytes(unet)
    quantize_base_linears(unet, kind)
    quantized = sum(base_weight_nbytes(unet.get_submodule(n)) for n in names)
    # fp8: 1 byte a weight + an fp32 scale per row (bf16 biases stay). NF4: half a byte + an 8-bit
    # absmax per 64 weights + ~1.3 KiB of codebooks per layer, a visible share at the tiny widths.
    # Measured: 0.517 and 0.288. The rest of the UNet (convs, embeddings) keeps its bf16 bytes.
    low, high = {"fp8": (0.50, 0.53), "nf4": (0.25, 0.30)}[kind]
    assert low < quantized / bf16 < high
    assert base_weight_nbytes(unet) == whole_bf16 - bf16 + quantized


@pytest.mark.parametrize("kind", KINDS)
def test_base_weight_bytes_of_an_sdxl_size_layer(kind):
    """Against a hand count, for SDXL's widest attention projection (1280 x 1280, with bias)."""
    out_f = in_f = 1280
    holder = one_layer_holder(torch.nn.Linear(in_f, out_f).to(torch.bfloat16))
    quantize_base_linears(holder, kind)
    nbytes = base_weight_nbytes(holder)
    n, bias = out_f * in_f, out_f * 2
    if kind == "fp8":
        assert nbytes == n + out_f * 4 + bias
    else:
        blocks = math.ceil(n / 64)
        floor = n // 2 + blocks + bias  # packed nibbles + one 8-bit absmax per block
        assert floor < nbytes < floor + math.ceil(blocks / 256) * 4 + 1500  # + fp32 second-level absmax, codebooks
        assert nbytes / (n * 2 + bias) < 0.26


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_saved_adapter_keys_do_not_depend_on_the_base(kind, tmp_path):
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    def keys_and_shapes(path):
        with safe_open(str(path), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}

    cfg = LoraConfig(rank=4, alpha=4.0, targets="attn_ff")
    plain, quantized = tiny_unet(), tiny_unet()
    quantize_base_linears(quantized, kind)
    for unet in (plain, quantized):
        add_unet_adapter(unet, cfg)
    assert get_peft_model_state_dict(quantized).keys() == get_peft_model_state_dict(plain).keys()
    for fmt in ("kohya", "diffusers"):
        a = save_adapter(tmp_path / f"plain-{fmt}.safetensors", plain, fmt=fmt)
        b = save_adapter(tmp_path / f"quantized-{fmt}.safetensors", quantized, fmt=fmt)
        assert keys_and_shapes(a) == keys_and_shapes(b)


def test_quantizing_after_adapters_is_refused():
    unet = tiny_unet()
    add_unet_adapter(unet, LoraConfig(rank=4, alpha=4.0, targets="attn"))
    with pytest.raises(ValueError, match="before add_unet_adapter"):
        quantize_base_linears(unet, "fp8")


def test_nf4_without_bitsandbytes_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        quantize_base_linears(tiny_unet(), "nf4")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_lora_trains_on_a_quantized_base_on_cuda(kind):
    """The CUDA kernels (bitsandbytes' 4-bit, fp8 casts): quantized straight onto the GPU, LoRA trains."""
    unet = tiny_unet()
    quantize_base_linears(unet, kind, device="cuda")
    assert unet.get_submodule("mid_block.attentions.0.proj_in").weight.is_cuda
    add_unet_adapter(unet, LoraConfig(rank=4, alpha=4.0, targets="attn_ff"))
    unet.to("cuda")
    inputs = {k: v.to("cuda") for k, v in batch().items() if k != "added_cond_kwargs"}
    inputs["added_cond_kwargs"] = {k: v.to("cuda") for k, v in batch()["added_cond_kwargs"].items()}
    target = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)).to("cuda")
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.mse_loss(unet(**inputs).sample.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses
