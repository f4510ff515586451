"""Checkpointing granularity and activation offload: less memory, the same gradients."""

from __future__ import annotations

import pytest
import torch

from finetune.memory.activations import checkpointed_modules, enable_checkpointing, saved_activations


from conftest import make_tiny_unet as tiny_unet, unet_inputs


def loss_and_grads(unet, mode: str | None):
    if mode is not None:
        enable_checkpointing(unet, mode)
    unet.train()
    sample, cond = unet_inputs(unet, seed=1)
    with saved_activations(mode is not None, mode or "full", torch.device("cpu"), unet):
        loss = unet(sample, torch.tensor([500]), **cond).sample.pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "transformer", "resnet", "offload"])
def test_every_mode_gives_the_gradients_of_no_checkpointing(mode):
    reference_loss, reference = loss_and_grads(tiny_unet(), None)
    loss, grads = loss_and_grads(tiny_unet(), mode)
    assert torch.equal(loss, reference_loss)
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_modes_choose_which_blocks_recompute():
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    def kinds(mode):
        unet = tiny_unet()
        enable_checkpointing(unet, mode)
        modules = dict(unet.named_modules())
        return {isinstance(modules[name], Transformer2DModel) for name in checkpointed_modules(unet)}, unet

    assert kinds("full")[0] == {True, False}
    assert kinds("transformer")[0] == {True}
    assert kinds("resnet")[0] == {False}
    assert checkpointed_modules(kinds("offload")[1]) == []  # offload recomputes nothing


def test_offload_is_chosen_only_with_checkpointing_on_and_knows_the_weights_it_keeps():
    import contextlib

    from finetune.memory.activations import _OffloadToCpu

    unet = tiny_unet()
    ctx = saved_activations(True, "offload", torch.device("cpu"), unet)
    assert isinstance(ctx, _OffloadToCpu)
    # Every weight's storage is known, so autograd's saved views of the weights stay on the GPU.
    assert ctx.weight_storages == {p.untyped_storage().data_ptr() for p in unet.parameters()}
    for enabled, mode in ((True, "full"), (False, "offload"), (True, "transformer")):
        assert isinstance(saved_activations(enabled, mode, torch.device("cpu"), unet), contextlib.nullcontext)


@pytest.mark.gpu
def test_offload_and_partial_checkpointing_lower_peak_gpu_memory():
    peaks = {}
    for mode in (None, "transformer", "offload", "full"):
        unet = tiny_unet().cuda()
        if mode:
            enable_checkpointing(unet, mode)
        x, cond = unet_inputs(unet, 64, 64, batch=2, device="cuda")
        torch.cuda.reset_peak_memory_stats()
        with saved_activations(mode is not None, mode or "full", torch.device("cuda"), unet):
            loss = unet(x, torch.tensor([500, 500], device="cuda"), **cond).sample.float().pow(2).mean()
        loss.backward()
        peaks[mode] = torch.cuda.max_memory_allocated()
        del unet, loss
        torch.cuda.empty_cache()
    assert peaks["full"] < peaks["transformer"] < peaks[None]
    assert peaks["offload"] < peaks[None]
