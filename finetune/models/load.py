"""Load SDXL's parts (UNet, VAE, both text encoders and tokenizers, noise scheduler) from local files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.errors import ModelError

SDXL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


@dataclass
class SDXLModels:
    unet: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    noise_scheduler: Any  # a DDPMScheduler with the model's training betas
    name: str
    source_path: Path

    @property
    def tokenizers(self) -> tuple:
        return (self.tokenizer, self.tokenizer_2)

    @property
    def text_encoders(self) -> tuple:
        return (self.text_encoder, self.text_encoder_2)


def check_diffusers_folder(path: Path) -> None:
    """Raise ModelError unless `path` looks like an SDXL diffusers folder."""
    missing = [part for part in SDXL_PARTS if not (path / part).is_dir()]
    if not (path / "model_index.json").is_file() or missing:
        raise ModelError(
            f"{path}: not an SDXL diffusers folder (missing: {', '.join(missing) or 'model_index.json'}); "
            "point model.pretrained at a folder saved by diffusers or at a single-file .safetensors"
        )


def load_models(cfg, dtype: torch.dtype = torch.float32) -> SDXLModels:
    """Load every part of SDXL named by `cfg` (a `finetune.config.ModelConfig`).

    Raises:
        ModelError: naming the path when it is not a model we can read.
    """
    path = Path(cfg.pretrained)
    if not path.exists():
        raise ModelError(f"{path}: model not found (model.pretrained must be a local diffusers folder or .safetensors)")
    if path.is_file():
        from finetune.models.single_file import load_single_file_pipeline

        pipe = load_single_file_pipeline(path, allow_pickle=cfg.allow_pickle, dtype=dtype, config_dir=cfg.config)
    else:
        check_diffusers_folder(path)
        pipe = _load_diffusers_folder(path, dtype)
    vae = pipe.vae
    if cfg.vae is not None:  # e.g. the fp16-safe SDXL VAE in place of the checkpoint's own
        from finetune.models.single_file import load_vae

        vae = load_vae(Path(cfg.vae), dtype=dtype, allow_pickle=cfg.allow_pickle)
    from diffusers import DDPMScheduler

    return SDXLModels(
        unet=pipe.unet,
        vae=vae,
        text_encoder=pipe.text_encoder,
        text_encoder_2=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer_2,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        name=cfg.name or (path.stem if path.is_file() else path.name),
        source_path=path,
    )


def _load_diffusers_folder(path: Path, dtype: torch.dtype):
    from diffusers import StableDiffusionXLPipeline

    try:
        return StableDiffusionXLPipeline.from_pretrained(
            path, torch_dtype=dtype, local_files_only=True, use_safetensors=True
        )
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelError(f"{path}: could not load the SDXL diffusers folder: {err}") from None
