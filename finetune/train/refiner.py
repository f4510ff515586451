"""What a refiner run does differently, in one place: its timestep range, and what it cannot train."""

from __future__ import annotations

from finetune.errors import ConfigError
from finetune.models.refiner import REFINER_TIMESTEPS


def refiner_run_config(cfg, kind: str):
    """(cfg, plan line): for a refiner, the refiner's part of the schedule unless loss.max_timestep sets one.

    SDXL's refiner denoises only the first ~200 of the 1000 noise levels (paper §2.5; diffusers'
    hand-off at denoising_start = 0.8 gives timesteps below 200), so by default it trains on [0, 200).

    Raises:
        ConfigError: training.train_text_encoder on a refiner (see the README: no LoRA key naming
            for the refiner's lone bigG loads in both ComfyUI and diffusers).
    """
    if kind != "refiner":
        return cfg, None
    if cfg.training.train_text_encoder:
        raise ConfigError("training.train_text_encoder = true: the refiner's text encoder is not trained (ComfyUI "
                          "and diffusers read its LoRA keys under different names); set it to false")
    if cfg.loss.max_timestep is not None:
        return cfg, (f"refiner: timesteps [{cfg.loss.min_timestep}, {cfg.loss.max_timestep}) "
                     "as loss.min_timestep/max_timestep set them")
    low, high = REFINER_TIMESTEPS
    if cfg.loss.min_timestep >= high:
        raise ConfigError(f"loss.min_timestep = {cfg.loss.min_timestep}: the refiner trains on [{low}, {high}) unless "
                          f"loss.max_timestep says otherwise; set loss.max_timestep above {cfg.loss.min_timestep}")
    # An explicit value from here on: the run's resolved config reloads to the same range.
    cfg = cfg.model_copy(deep=True)
    cfg.loss.max_timestep = high
    return cfg, (f"refiner: training on timesteps [{cfg.loss.min_timestep}, {high}), its part of the schedule (SDXL "
                 "paper §2.5); set loss.max_timestep to change it")
