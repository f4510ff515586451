"""Load SDXL's parts (UNet, VAE, both text encoders and tokenizers, noise scheduler) from local files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.errors import ModelError
from finetune.models.refiner import check_kind, kind_of_folder
from finetune.models.single_file import UNET_PREFIX, load_single_file_pipeline, load_vae, read_shapes, single_file_kind

# diffusers is imported inside the functions that use it: importing it takes seconds.

SDXL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
REFINER_PARTS = ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler")
# What the UNet takes in: the VAE's 4 latent channels (SDXL base and refiner alike). An inpainting UNet
# takes 9 (latents, mask, masked image latents) and would fail only at the first step, after the caching.
UNET_IN_CHANNELS = 4


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
    kind: str = "base"  # "base" or "refiner" (finetune.models.refiner), found from the weights

    @property
    def tokenizers(self) -> tuple:
        # The refiner has bigG alone: its tokenizer and encoder are the "_2" ones, as in diffusers.
        return (self.tokenizer_2,) if self.kind == "refiner" else (self.tokenizer, self.tokenizer_2)

    @property
    def text_encoders(self) -> tuple:
        return (self.text_encoder_2,) if self.kind == "refiner" else (self.text_encoder, self.text_encoder_2)


def check_diffusers_folder(path: Path, kind: str = "base") -> None:
    """Raise ModelError unless `path` looks like an SDXL (base or refiner) diffusers folder."""
    parts = REFINER_PARTS if kind == "refiner" else SDXL_PARTS
    missing = [part for part in parts if not (path / part).is_dir()]
    if not (path / "model_index.json").is_file() or missing:
        raise ModelError(
            f"{path}: not an SDXL diffusers folder (missing: {', '.join(missing) or 'model_index.json'}); "
            "point model.pretrained at a folder saved by diffusers or at a single-file .safetensors"
        )


def check_unet_inputs(cfg) -> None:
    """Refuse a UNet whose input channels are not SDXL's 4, from `unet/config.json` or a single file's
    header (no weights read). `cfg` is a `finetune.config.ModelConfig`; a pickled file is left to
    `load_models`, which decides whether it may be opened at all.

    Raises:
        ModelError: naming the file, the input channels found and what is supported.
    """
    path = Path(cfg.pretrained)
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            return
        key = f"{UNET_PREFIX}input_blocks.0.0.weight"  # SGM's name of diffusers' conv_in
        shape = read_shapes(path).get(key)
        if shape is None or len(shape) != 4:
            return  # no SDXL UNet at all: load_models says what the file holds
        found, where = shape[1], f"{path}: {key} has shape {tuple(shape)}, so"
    else:
        config = path / "unet" / "config.json"
        try:
            found = int(json.loads(config.read_text(encoding="utf-8"))["in_channels"])
        except (OSError, ValueError, KeyError, TypeError):
            return  # load_models names what is missing or broken
        where = f"{config}:"
    if found != UNET_IN_CHANNELS:
        what = " (an inpainting UNet: latents, mask and masked image)" if found == 9 else ""
        raise ModelError(f"{where} the UNet takes {found} input channels{what}; training supports "
                         f"{UNET_IN_CHANNELS} input channels (SDXL base or refiner): point model.pretrained at one")


def load_models(cfg, dtype: torch.dtype = torch.float32) -> SDXLModels:
    """Load every part of SDXL named by `cfg` (a `finetune.config.ModelConfig`).

    Raises:
        ModelError: naming the path when it is not a model we can read.
    """
    path, kind = Path(cfg.pretrained), model_kind(cfg)
    if path.is_file():
        pipe = load_single_file_pipeline(path, allow_pickle=cfg.allow_pickle, dtype=dtype, config_dir=cfg.config,
                                         kind=kind)
    else:
        pipe = _load_diffusers_folder(path, dtype, kind)
    vae = pipe.vae
    if cfg.vae is not None:  # e.g. the fp16-safe SDXL VAE in place of the checkpoint's own
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
        kind=kind,
    )


def model_kind(cfg) -> str:
    """"base" or "refiner" for `cfg.pretrained` (a `ModelConfig`), from its configs or its single-file
    header: no weights are loaded, so a run can check it before minutes of scanning and caching.

    Raises:
        ModelError: naming the path when it is not a model we can read, or not the `cfg.kind` asked for.
    """
    path = Path(cfg.pretrained)
    if not path.exists():
        raise ModelError(f"{path}: model not found (model.pretrained must be a local diffusers folder or .safetensors)")
    if path.is_file():
        return check_kind(single_file_kind(path, allow_pickle=cfg.allow_pickle), cfg.kind, str(path))
    kind = check_kind(folder_kind(path), cfg.kind, str(path))
    check_diffusers_folder(path, kind)
    return kind


def folder_kind(path: Path) -> str:
    """"base" or "refiner" for a diffusers folder (ModelError naming it when it is no SDXL folder)."""
    if not (path / "model_index.json").is_file():
        check_diffusers_folder(path)  # raises, naming what is missing
    return kind_of_folder(path)


def _load_diffusers_folder(path: Path, dtype: torch.dtype, kind: str = "base"):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    pipeline_class = StableDiffusionXLImg2ImgPipeline if kind == "refiner" else StableDiffusionXLPipeline
    try:
        return pipeline_class.from_pretrained(
            path, torch_dtype=dtype, local_files_only=True, use_safetensors=True
        )
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelError(f"{path}: could not load the SDXL diffusers folder: {err}") from None
