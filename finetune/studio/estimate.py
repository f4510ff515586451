"""The pre-flight memory estimate for a config on a card of a given size, as `finetune train` prints it.

The UNet is built from the model's own config on the meta device (no weights, no memory) and set up by
the trainer's `prepare_unet`, so the estimate counts exactly the parameters training would.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from finetune.config import LoraConfig, MemoryConfig, TrainingConfig
from finetune.errors import ConfigError
from finetune.models.configs import sdxl_unet_config

# diffusers and the trainer's builders are imported when an estimate runs: importing them takes seconds.

CARD_SIZES_GIB = (8, 12, 16, 24)


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


def preflight(cfg, card_gib: float) -> str:
    """Which memory profile applies on a card with `card_gib` free, and the estimated peak, as Markdown."""
    from finetune.memory.profiles import apply_memory_profile, estimate_run_gib

    try:
        resolved, message = apply_memory_profile(cfg, free_gib=float(card_gib))
    except ConfigError as err:
        return f"**memory profile**: {err}"
    training, memory = resolved.training, resolved.memory
    try:
        # The adapter's own init file is not read for a count: its shapes are the config's.
        lora = resolved.lora.model_copy(update={"init_from": None})
        unet, params = _prepared_unet(unet_config_source(resolved.model.pretrained), training.model_dump_json(),
                                      memory.model_dump_json(), lora.model_dump_json())
        gib = estimate_run_gib(unet, params, training, memory, resolved.optimizer.name,
                               resolved.dataset.resolution ** 2)
    except Exception as err:  # noqa: BLE001 - e.g. nf4 needs real tensors; the page says why, not crash
        return f"{message or 'memory profile: custom'}\n\nno estimate for these settings: {err}"
    verdict = "fits" if gib <= card_gib else "**does not fit**"
    amount = f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.0f} MiB"  # the tiny model needs MiBs
    lines = [f"**estimated peak GPU memory: {amount}** on a {card_gib:g} GiB card: {verdict} "
             f"(at {resolved.dataset.resolution}², batch {training.batch_size})",
             message or "memory profile: custom (the config's own keys)"]
    return "\n\n".join(lines)
