"""The memory estimate of a config without a GPU or weights: the UNet built from its config on the meta device.

The UNet is set up by the trainer's `prepare_unet`, so the estimate counts exactly the parameters training
would. The studio's Config page and `finetune train --dry-run` both ask here.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from finetune.config import LoraConfig, MemoryConfig, TrainingConfig
from finetune.models.configs import sdxl_unet_config

# torch, diffusers and the trainer's builders are imported when an estimate runs: importing them takes seconds.


def unet_config_source(pretrained: Path) -> str:
    """A diffusers folder's own `unet/config.json`, else SDXL's (single files are SDXL-shaped)."""
    path = Path(pretrained) / "unet" / "config.json"
    return str(path) if path.is_file() else "sdxl"


@lru_cache(maxsize=8)
def _prepared_unet(source: str, training_json: str, memory_json: str, lora_json: str):
    """(meta UNet, trained params) for these settings; cached because building SDXL's takes ~1.5 s."""
    import torch
    from diffusers import UNet2DConditionModel

    from finetune.train.builders import prepare_unet

    config = sdxl_unet_config() if source == "sdxl" else json.loads(Path(source).read_text(encoding="utf-8"))
    meta = torch.device("meta")
    with meta:
        unet = UNet2DConditionModel.from_config(config)
    params = prepare_unet(unet, TrainingConfig.model_validate_json(training_json),
                          MemoryConfig.model_validate_json(memory_json), LoraConfig.model_validate_json(lora_json),
                          device=meta)
    return unet, params


def config_peak_gib(cfg, pixels: int | None = None) -> float:
    """Estimated peak GPU memory (GiB) of the run `cfg` says, its memory profile already applied.

    Args:
        pixels: the largest training image's (default: dataset.resolution²).

    Raises:
        Exception: settings the meta device cannot build (e.g. nf4 needs real tensors).
    """
    from finetune.memory.profiles import estimate_run_gib

    training, memory = cfg.training, cfg.memory
    # The adapter's own init file is not read for a count: its shapes are the config's.
    lora = cfg.lora.model_copy(update={"init_from": None})
    unet, params = _prepared_unet(unet_config_source(cfg.model.pretrained), training.model_dump_json(),
                                  memory.model_dump_json(), lora.model_dump_json())
    return estimate_run_gib(unet, params, training, memory, cfg.optimizer.name, pixels or cfg.dataset.resolution ** 2)
