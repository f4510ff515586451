"""The denoising objective: noise, timesteps, noisy input, target (epsilon or v) and the weighted loss.

diffusers' DDPMScheduler owns the schedule (`add_noise`, `get_velocity`, `alphas_cumprod`); these
small pure functions only combine it as SDXL training does. Randomness comes only from the
generator passed in, so a resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from finetune.errors import ConfigError
from finetune.rng import draw_rows

PREDICTION_TYPES = ("epsilon", "v_prediction")
LOSS_TYPES = ("l2", "huber", "smooth_l1")


def make_noise_scheduler(scheduler_config: dict, zero_terminal_snr: bool = False) -> DDPMScheduler:
    """The training scheduler: the model's betas, rescaled to zero terminal SNR on request.

    Inference-only keys (timestep_spacing, steps_offset) are kept but do not affect training,
    which only reads `alphas_cumprod` through `add_noise`/`get_velocity`.
    """
    config = {key: value for key, value in scheduler_config.items() if not key.startswith("_")}
    return DDPMScheduler.from_config({**config, "rescale_betas_zero_snr": zero_terminal_snr})


def resolve_prediction_type(cfg_value: str, scheduler) -> str:
    """'auto' reads the scheduler config (SDXL base: epsilon; v-prediction fine-tunes say so there).

    Raises:
        ConfigError: the resolved type is one training does not support (e.g. "sample").
    """
    value = scheduler.config.prediction_type if cfg_value == "auto" else cfg_value
    if value not in PREDICTION_TYPES:
        source = "the model's scheduler config says" if cfg_value == "auto" else "set to"
        raise ConfigError(
            f"loss.prediction_type = {cfg_value!r}: {source} {value!r}, which training does not support; "
            f"set loss.prediction_type to one of {', '.join(PREDICTION_TYPES)}"
        )
    return value


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    # Drawn in fp32 on the generator's device, then moved: the same seed gives the same noise
    # whatever the latents' dtype or device. Rows are samples: a shared step generator draws for
    # every process's rows and keeps this one's (rng.draw_rows).
    device = generator.device if generator is not None else like.device
    rows = draw_rows(lambda n: torch.randn((n, *shape[1:]), generator=generator, device=device), shape[0], generator)
    return rows.to(like.device, like.dtype)


def sample_noise(latents: torch.Tensor, generator: torch.Generator | None,
                 noise_offset: float = 0.0, random_strength: bool = False,
                 multires_iterations: int | None = None, multires_discount: float = 0.3) -> torch.Tensor:
    """Gaussian noise like `latents` (B, C, h, w).

    Offset noise adds noise_offset · N(0, 1) per sample and channel, shifting each channel's mean:
    the model then learns to change an image's overall brightness (very dark or bright images).
    With `random_strength` each sample's offset strength is drawn uniformly from [0, noise_offset).
    With `multires_iterations`, kohya's pyramid noise is added after the offset (`pyramid_noise`).
    """
    noise = _offset_noise(latents, generator, noise_offset, random_strength)
    if multires_iterations:
        noise = pyramid_noise(noise, generator, multires_iterations, multires_discount)
    return noise


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator | None, iterations: int,
                  discount: float) -> torch.Tensor:
    """kohya's `pyramid_noise_like`: add upsampled coarser noise, level i at discount**i, then divide by
    the whole batch's std.

    Level i is (h, w) / r**i with r drawn from [2, 4) each level, bilinear-upsampled (align_corners
    False); it stops after the first level one pixel high or wide. kohya draws r from Python's global
    `random`; here every draw comes from `generator`, so a resumed run adds the same noise.
    """
    b, c, h, w = noise.shape
    device = generator.device if generator is not None else noise.device
    out = noise.float()
    for i in range(iterations):
        r = float(torch.rand((), generator=generator, device=device)) * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        level = torch.randn((b, c, hn, wn), generator=generator, device=device).to(out.device)
        out = out + F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hn == 1 or wn == 1:
            break
    return (out / out.std()).to(noise.dtype)


def _offset_noise(latents: torch.Tensor, generator: torch.Generator | None, noise_offset: float,
                  random_strength: bool) -> torch.Tensor:
    noise = _randn(tuple(latents.shape), generator, latents)
    if noise_offset > 0:
        offset = _randn((latents.shape[0], latents.shape[1], 1, 1), generator, latents)  # (B, C, 1, 1)
        if random_strength:
            device = generator.device if generator is not None else latents.device
            strength = draw_rows(lambda n: torch.rand((n, 1, 1, 1), generator=generator, device=device),
                                 latents.shape[0], generator)
            offset = offset * strength.to(offset)
        noise = noise + noise_offset * offset
    return noise


def timestep_range(num_train_timesteps: int, min_timestep: int = 0, max_timestep: int | None = None) -> tuple[int, int]:
    """The [low, high) timesteps training draws from: all of the scheduler's unless the config narrows them.

    Raises:
        ConfigError: the range reaches past the scheduler's last timestep or is empty.
    """
    high = num_train_timesteps if max_timestep is None else max_timestep
    if high > num_train_timesteps:
        raise ConfigError(f"loss.max_timestep = {max_timestep}: the model's scheduler has {num_train_timesteps} "
                          f"timesteps; use at most {num_train_timesteps}")
    if min_timestep >= high:
        raise ConfigError(f"loss.min_timestep = {min_timestep}: must be below {high} (loss.max_timestep)")
    return min_timestep, high


def sample_timesteps(batch_size: int, high: int, generator: torch.Generator | None,
                     device: torch.device | str, low: int = 0) -> torch.Tensor:
    """Uniform integer timesteps in [low, high), a LongTensor of shape (B,); see `timestep_range`."""
    draw_on = generator.device if generator is not None else device
    timesteps = draw_rows(lambda n: torch.randint(low, high, (n,), generator=generator, device=draw_on),
                          batch_size, generator)
    return timesteps.to(device)


def noisy_latents(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  input_perturbation: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """sqrt(ᾱ_t)·x + sqrt(1-ᾱ_t)·n, the UNet's input.

    Input perturbation (Ning et al. 2023) noises the input with n + γ·ξ while the target stays n:
    it reduces the train/inference exposure bias.
    """
    if input_perturbation > 0:
        noise = noise + input_perturbation * _randn(tuple(noise.shape), generator, noise)
    return scheduler.add_noise(latents, noise, timesteps)


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    """epsilon: the noise; v_prediction: sqrt(ᾱ_t)·n − sqrt(1-ᾱ_t)·x."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ConfigError(f"loss.prediction_type = {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t/(1-ᾱ_t) per timestep, fp32, shape (B,). Zero at a zero-SNR last step."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alphas_cumprod / (1 - alphas_cumprod)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), fp32, shape (B,).

    epsilon: min(SNR, γ)/SNR; v_prediction: min(SNR, γ)/(SNR + 1), the same weighting of the
    x0 error seen through the v target.
    """
    value = snr(scheduler, timesteps)
    if prediction_type == "v_prediction":
        return torch.clamp(value, max=gamma) / (value + 1)
    if prediction_type == "epsilon":
        # Written as a choice rather than a division so SNR = 0 (zero terminal SNR) gives 1, its limit.
        return torch.where(value > gamma, gamma / value.clamp(min=gamma), torch.ones_like(value))
    raise ConfigError(f"loss.prediction_type = {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}")


def debiased_weights(scheduler, timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Debiased-estimation loss weights (Yu et al. 2023), fp32, shape (B,).

    epsilon: 1/√SNR, which evens out how much each timestep's noise error counts; v_prediction:
    √SNR/(SNR + 1), the same weighting seen through the v target (as min_snr_weights converts it).
    SNR is floored at 1e-3 so a zero-SNR last step gets a finite weight (≈ 32) under epsilon.
    """
    value = snr(scheduler, timesteps)
    if prediction_type == "v_prediction":
        return value.sqrt() / (value + 1)
    if prediction_type == "epsilon":
        return value.clamp(min=1e-3).rsqrt()
    raise ConfigError(f"loss.prediction_type = {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}")


def _elementwise(pred: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: float) -> torch.Tensor:
    residual = pred - target
    if loss_type == "l2":
        return residual**2
    if loss_type == "huber":
        # Pseudo-Huber scaled by 2c: ≈ r² for |r| ≪ c (like l2), ≈ 2c·|r| for |r| ≫ c (robust to outliers).
        return 2 * huber_c * (torch.sqrt(residual**2 + huber_c**2) - huber_c)
    if loss_type == "smooth_l1":
        return F.smooth_l1_loss(pred, target, reduction="none", beta=huber_c)
    raise ConfigError(f"loss.type = {loss_type!r}: use one of {', '.join(LOSS_TYPES)}")


def _masked_mean(elementwise: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over the mask's area; the mask (B, 1, H, W) is area-resized to the latents."""
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.shape[0] != elementwise.shape[0] or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B, 1, H, W) with B = {elementwise.shape[0]}, got {tuple(mask.shape)}")
    mask = F.interpolate(mask.float().to(elementwise.device), size=elementwise.shape[-2:], mode="area")
    mask = mask.clamp(0, 1)  # (B, 1, h, w), broadcast over channels
    area = mask.sum(dim=(1, 2, 3)) * elementwise.shape[1]
    # An empty mask gives that sample a loss of 0 rather than 0/0.
    return (elementwise * mask).sum(dim=(1, 2, 3)) / area.clamp(min=1e-8)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, *, loss_type: str = "l2", huber_c: float = 0.1,
                   weights: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The batch loss, a scalar in fp32.

    Args:
        pred, target: (B, C, h, w) model output and target.
        loss_type: "l2", "huber" (pseudo-Huber with threshold huber_c) or "smooth_l1" (beta huber_c).
        weights: (B,) per-sample weights (min-SNR, prior-preservation weight), applied to the
            per-sample means before the batch mean.
        mask: (B, 1, H, W) in [0, 1], any size: elements are weighted by it, averaged over its area.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    # fp32 even under autocast: squared residuals of bf16 values lose the small differences.
    elementwise = _elementwise(pred.float(), target.float(), loss_type, huber_c)
    if mask is None:
        per_sample = elementwise.mean(dim=tuple(range(1, elementwise.dim())))  # (B,)
    else:
        per_sample = _masked_mean(elementwise, mask)
    if weights is not None:
        if weights.shape != per_sample.shape:
            raise ValueError(f"weights must be (B,) = {tuple(per_sample.shape)}, got {tuple(weights.shape)}")
        per_sample = per_sample * weights.float().to(per_sample.device)
    return per_sample.mean()
