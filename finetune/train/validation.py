"""Validation loss on held-out images at fixed timesteps and fixed noise: a curve that only moves with the model."""

from __future__ import annotations

import torch

from finetune.rng import step_generator
from finetune.train.batches import collate
from finetune.train.loss import diffusion_loss, noisy_latents, training_target
from finetune.train.step import batch_latents, batch_text


@torch.no_grad()
def validation_loss(unet, dataset, timesteps: list[int], noise_scheduler, prediction_type: str, *,
                    vae, text_encode, device, seed: int, batch_size: int = 4) -> float:
    """Mean loss over held-out samples x `timesteps`, with noise fixed per (sample, timestep)."""
    was_training = unet.training
    unet.eval()
    by_bucket: dict[tuple, list[int]] = {}
    for i in range(len(dataset)):
        by_bucket.setdefault(tuple(dataset.rows[i]["bucket"]), []).append(i)
    total, count = 0.0, 0
    for indices in by_bucket.values():
        for start in range(0, len(indices), batch_size):
            batch = collate([dataset[i] for i in indices[start:start + batch_size]])
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            latents = batch_latents(batch, vae, step_generator(seed, -1, start, 0, device))
            prompt_embeds, pooled = batch_text(batch, text_encode)
            prompt_embeds, pooled = prompt_embeds.to(device, torch.float32), pooled.to(device, torch.float32)
            for t in timesteps:
                g = step_generator(seed, -2, start, t, device)
                noise = torch.randn(latents.shape, generator=g, device=device)
                steps = torch.full((latents.shape[0],), t, device=device, dtype=torch.long)
                noisy = noisy_latents(noise_scheduler, latents, noise, steps)
                pred = unet(noisy, steps, encoder_hidden_states=prompt_embeds, added_cond_kwargs={
                    "text_embeds": pooled, "time_ids": batch["add_time_ids"]}).sample
                target = training_target(noise_scheduler, latents, noise, steps, prediction_type)
                total += diffusion_loss(pred.float(), target.float()).item() * latents.shape[0]
                count += latents.shape[0]
    unet.train(was_training)
    return total / max(count, 1)
