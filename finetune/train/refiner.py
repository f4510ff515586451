"""What a refiner run does differently, in one place: its timestep range, and what it cannot train."""

from __future__ import annotations

from finetune.errors import ConfigError
from finetune.models.refiner import REFINER_TIMESTEPS


def refiner_run_config(cfg, kind: str):
    """(cfg, plan line): for a refiner, the refiner's part of the schedule unless loss sets one.

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
    if {"min_timestep", "max_timestep"} & cfg.loss.model_fields_set:
        return cfg, (f"refiner: timesteps [{cfg.loss.min_timestep}, {cfg.loss.max_timestep or 'end'}) "
                     "as loss.min_timestep/max_timestep set them")
    cfg = cfg.model_copy(deep=True)
    low, high = REFINER_TIMESTEPS
    cfg.loss.min_timestep, cfg.loss.max_timestep = low, high
    cfg.loss.model_fields_set.discard("min_timestep")  # still the refiner's default, not the user's choice
    cfg.loss.model_fields_set.discard("max_timestep")
    return cfg, (f"refiner: training on timesteps [{low}, {high}), its part of the schedule (SDXL paper §2.5); "
                 "set loss.min_timestep/max_timestep to change it")
