"""One training step's math: batch -> (latents, text conditioning) -> noise -> UNet -> loss."""

from __future__ import annotations

import torch

from finetune.rng import draw_rows
from finetune.train.loss import (
    debiased_weights,
    diffusion_loss,
    min_snr_weights,
    noisy_latents,
    sample_noise,
    sample_timesteps,
    timestep_range,
    training_target,
)


def batch_latents(batch: dict, vae, generator: torch.Generator) -> torch.Tensor:
    """Latents (B, 4, H/8, W/8) sampled from the cached distribution, or encoded now from pixels."""
    if "latents_mean" in batch:
        mean = batch["latents_mean"].float()
        std = batch.get("latents_std")
    else:
        # Same sampling as the cache path (mean + std·ε, scaled), so both give the same latents.
        with torch.no_grad():
            dist = vae.encode(batch["pixels"].to(vae.device, vae.dtype)).latent_dist
        scale = vae.config.scaling_factor
        mean, std = dist.mean.float() * scale, dist.std.float() * scale
    if std is None:
        return mean
    noise = draw_rows(lambda n: torch.randn((n, *mean.shape[1:]), generator=generator, device=generator.device),
                      mean.shape[0], generator).to(mean.device)
    return mean + std.float().to(mean.device) * noise


def batch_text(batch: dict, text_encode) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (B, 77k, 2048), pooled_prompt_embeds (B, 1280)) from the cache or encoded now."""
    if "prompt_embeds" in batch:
        return batch["prompt_embeds"], batch["pooled_prompt_embeds"]
    return text_encode(batch["caption"])


def diffusion_step_loss(unet, noise_scheduler, latents, prompt_embeds, pooled_prompt_embeds, add_time_ids,
                        loss_weight, loss_cfg, prediction_type: str, generator: torch.Generator,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """The SDXL denoising loss for one batch (scalar, fp32)."""
    device = latents.device
    noise = sample_noise(latents, generator, loss_cfg.noise_offset, loss_cfg.noise_offset_random_strength,
                         loss_cfg.multires_noise_iterations, loss_cfg.multires_noise_discount)
    low, high = timestep_range(noise_scheduler.config.num_train_timesteps, loss_cfg.min_timestep, loss_cfg.max_timestep)
    timesteps = sample_timesteps(latents.shape[0], high, generator, device, low)
    noisy = noisy_latents(noise_scheduler, latents, noise, timesteps, loss_cfg.input_perturbation, generator)
    pred = unet(
        noisy,
        timesteps,
        encoder_hidden_states=prompt_embeds,
        added_cond_kwargs={"text_embeds": pooled_prompt_embeds, "time_ids": add_time_ids},
    ).sample
    target = training_target(noise_scheduler, latents, noise, timesteps, prediction_type)
    weights = loss_weight.float().to(device)
    if loss_cfg.min_snr_gamma is not None:
        weights = weights * min_snr_weights(noise_scheduler, timesteps, loss_cfg.min_snr_gamma, prediction_type)
    if loss_cfg.debiased_estimation:
        weights = weights * debiased_weights(noise_scheduler, timesteps, prediction_type)
    return diffusion_loss(pred.float(), target.float(), loss_type=loss_cfg.type, huber_c=loss_cfg.huber_c,
                          weights=weights, mask=mask)


def epoch_window(acc, batch_in_epoch: int, batches: int) -> float:
    """Accumulation windows never cross an epoch's end: the epoch's last window steps at its last micro-batch
    with the micro-batches it has, as Accelerate's `sync_with_dataloader` does for a loader it prepared (ours is
    not: the sampler shards and resumes itself). Windows start at the epoch's batches 0, n, 2n, ...

    Args:
        batch_in_epoch: this micro-batch's place in the epoch, counting from 1.
        batches: the epoch's micro-batches (`len(loader)`).

    Returns:
        The factor for this micro-batch's loss: `accelerator.backward` divides by n, a window of k < n
        micro-batches must average over k.
    """
    n = acc.gradient_accumulation_steps
    size = min(n, batches - (batch_in_epoch - 1) // n * n)
    if batch_in_epoch == batches and size < n:
        acc.step = n - 1  # Accelerate syncs when its counter reaches a multiple of n: this micro-batch does
    return n / size
