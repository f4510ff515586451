"""The denoising objective: noise, timesteps, noisy input, target (epsilon or v) and the weighted loss.

diffusers' DDPMScheduler owns the schedule (`add_noise`, `get_velocity`, `alphas_cumprod`); these
small pure functions only combine it as SDXL training does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction")


def make_noise_scheduler(scheduler_config: dict, zero_terminal_snr: bool = False):
    """The training scheduler: DDPM betas from the model's scheduler config (rescaled to zero terminal SNR on request)."""
    from diffusers import DDPMScheduler

    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    return DDPMScheduler.from_config({**config, "rescale_betas_zero_snr": zero_terminal_snr})


def resolve_prediction_type(configured: str, scheduler) -> str:
    """'auto' reads the scheduler config (SDXL base: epsilon; v-prediction fine-tunes say so there)."""
    value = scheduler.config.prediction_type if configured == "auto" else configured
    if value not in PREDICTION_TYPES:
        raise ValueError(f"prediction type {value!r} is not supported (use one of {', '.join(PREDICTION_TYPES)})")
    return value


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like `latents`; offset noise adds a per-channel constant (helps very dark/bright images)."""
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device, latents.dtype)
    if noise_offset > 0:
        offset = torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=generator, device=generator.device)
        noise = noise + noise_offset * offset.to(latents.device, latents.dtype)
    return noise


def sample_timesteps(batch_size: int, num_train_timesteps: int, generator: torch.Generator,
                     device: torch.device) -> torch.Tensor:
    """Uniform integer timesteps in [0, num_train_timesteps), shape (B,)."""
    t = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=generator.device)
    return t.to(device)


def noisy_latents(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  input_perturbation: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """sqrt(ᾱ)·x + sqrt(1-ᾱ)·n; input perturbation noises the input a little more but not the target."""
    if input_perturbation > 0:
        extra = torch.randn(noise.shape, generator=generator, device=generator.device if generator else noise.device)
        noise = noise + input_perturbation * extra.to(noise.device, noise.dtype)
    return scheduler.add_noise(latents, noise, timesteps)


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    """epsilon: the noise; v_prediction: sqrt(ᾱ)·n − sqrt(1-ᾱ)·x."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ/(1-ᾱ) per timestep, fp32."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alphas_cumprod / (1 - alphas_cumprod)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), shape (B,)."""
    value = snr(scheduler, timesteps)
    clipped = torch.clamp(value, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (value + 1)
    return clipped / value.clamp(min=1e-8)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, *, loss_type: str = "l2", huber_c: float = 0.1,
                   weights: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-element loss, optionally masked, averaged per sample, weighted per sample, averaged: a scalar (fp32)."""
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        elementwise = (pred - target) ** 2
    elif loss_type == "huber":  # pseudo-Huber: quadratic near 0, linear far away
        elementwise = 2 * huber_c * (torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c)
    elif loss_type == "smooth_l1":
        elementwise = F.smooth_l1_loss(pred, target, reduction="none", beta=huber_c)
    else:
        raise ValueError(f"unknown loss type {loss_type!r}")
    if mask is not None:
        mask = F.interpolate(mask.float(), size=pred.shape[-2:], mode="area").to(pred.device)  # (B, 1, h, w)
        per_sample = (elementwise * mask).sum(dim=(1, 2, 3)) / (mask.sum(dim=(1, 2, 3)) * pred.shape[1]).clamp(min=1e-8)
    else:
        per_sample = elementwise.mean(dim=(1, 2, 3))
    if weights is not None:
        per_sample = per_sample * weights.float().to(per_sample.device)
    return per_sample.mean()
