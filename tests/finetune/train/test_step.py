"""Fidelity of one training step to SDXL: micro-conditioning, noisy input, target and loss."""

from __future__ import annotations

import pytest
import torch

from bucketing.assign import add_time_ids
from finetune.config import LossConfig
from finetune.train.loss import make_noise_scheduler
from finetune.models.configs import sdxl_scheduler_config
from finetune.train.step import batch_latents, diffusion_step_loss
from finetune.rng import step_generator


@pytest.fixture(scope="module")
def pipe():
    from finetune.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


@pytest.mark.parametrize("original, crop, target", [((1536, 1024), (0, 32), (1216, 832)), ((300, 500), (7, 0), (768, 1280))])
def test_add_time_ids_equal_the_pipelines(pipe, original, crop, target):
    reference = pipe._get_add_time_ids(original, crop, target, dtype=torch.float32,
                                       text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert reference.tolist() == [list(map(float, add_time_ids(original, crop, target)))]


class Recorder(torch.nn.Module):
    """Wraps the UNet and keeps what it was called with and what it returned."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, []

    def forward(self, sample, timestep, **kwargs):
        out = self.unet(sample, timestep, **kwargs)
        self.calls.append((sample.detach().clone(), timestep.clone(), kwargs, out.sample.detach().clone()))
        return out


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noisy_input_target_and_loss_follow_the_scheduler_formulas(pipe, prediction_type):
    scheduler = make_noise_scheduler({**sdxl_scheduler_config(), "prediction_type": prediction_type}, False)
    unet = Recorder(pipe.unet.eval())
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 12, generator=g, dtype=torch.float64).float()
    prompt_embeds = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    pooled = torch.randn(2, 64, generator=g)
    time_ids = torch.tensor([[64.0, 96, 0, 0, 64, 96]] * 2)
    with torch.no_grad():
        loss = diffusion_step_loss(unet, scheduler, latents, prompt_embeds, pooled, time_ids, torch.ones(2),
                                   LossConfig(), prediction_type, step_generator(0, 0, 0, 0, torch.device("cpu")))
    noisy, timesteps, kwargs, pred = unet.calls[0]
    assert kwargs["added_cond_kwargs"]["time_ids"] is time_ids
    assert kwargs["encoder_hidden_states"] is prompt_embeds
    ab = scheduler.alphas_cumprod.double()[timesteps].view(-1, 1, 1, 1)
    x = latents.double()
    noise = (noisy.double() - ab.sqrt() * x) / (1 - ab).sqrt()  # what the scheduler must have added
    assert noise.std().item() == pytest.approx(1.0, abs=0.25)  # it was standard normal noise
    target = noise if prediction_type == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * x
    reference = torch.mean((pred.double() - target) ** 2)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-4)


def test_the_unet_sees_only_timesteps_of_the_configured_range(pipe):
    scheduler = make_noise_scheduler(sdxl_scheduler_config(), False)
    unet = Recorder(pipe.unet.eval())
    latents = torch.randn(16, 4, 8, 8)
    cond = torch.randn(16, 77, pipe.unet.config.cross_attention_dim), torch.randn(16, 64)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 16)
    with torch.no_grad():
        diffusion_step_loss(unet, scheduler, latents, *cond, time_ids, torch.ones(16),
                            LossConfig(min_timestep=900, max_timestep=950), "epsilon",
                            step_generator(0, 0, 0, 0, torch.device("cpu")))
    timesteps = unet.calls[0][1]
    assert timesteps.min() >= 900 and timesteps.max() < 950


def test_debiased_estimation_scales_each_samples_loss_by_its_timesteps_weight(pipe):
    from finetune.train.loss import debiased_weights

    scheduler = make_noise_scheduler(sdxl_scheduler_config(), False)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cond = torch.randn(1, 77, pipe.unet.config.cross_attention_dim), torch.randn(1, 64)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]])

    def loss(**cfg):
        unet = Recorder(pipe.unet.eval())
        with torch.no_grad():
            value = diffusion_step_loss(unet, scheduler, latents, *cond, time_ids, torch.ones(1), LossConfig(**cfg),
                                        "epsilon", step_generator(0, 3, 0, 0, torch.device("cpu")))
        return value, unet.calls[0][1]

    (plain, t), (debiased, t_again) = loss(), loss(debiased_estimation=True)
    assert torch.equal(t, t_again)  # the same draw: only the weight differs
    assert debiased.item() == pytest.approx(plain.item() * debiased_weights(scheduler, t, "epsilon").item(), rel=1e-5)


def test_cached_and_fresh_latents_are_sampled_alike(pipe):
    """mean + std·ε from the same generator, whether the distribution was cached or encoded now."""
    vae = pipe.vae.eval()
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    scale = vae.config.scaling_factor
    cached = {"latents_mean": dist.mean * scale, "latents_std": dist.std * scale}
    fresh = batch_latents({"pixels": pixels}, vae, step_generator(0, 5, 0, 0, torch.device("cpu")))
    from_cache = batch_latents(cached, vae, step_generator(0, 5, 0, 0, torch.device("cpu")))
    torch.testing.assert_close(fresh, from_cache, rtol=1e-5, atol=1e-6)
