"""`finetune sample --refiner`: sampling with the SDXL refiner as the paper does, the base to the switch and
the refiner after (the pipelines and the two-stage call live in `finetune/sampling/pipelines.py`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.adapters.metadata_read import lora_kind
from finetune.config import ModelConfig
from finetune.errors import ConfigError, ModelError
from finetune.io import atomic_file, check_output, read_safetensors_header
from finetune.models.load import load_models
from finetune.sampling.pipelines import base_pipeline, check_switch, refiner_pipeline, sampling_dtype, two_stage

MAX_STEPS = 1000  # the noise schedule's length: diffusers' schedulers refuse more


def check_sampling(steps: int, height: int, width: int) -> None:
    """ConfigError naming the option when a render cannot run: called before any model is loaded."""
    if not 1 <= steps <= MAX_STEPS:
        raise ConfigError(f"--steps {steps}: must be between 1 and {MAX_STEPS} (20 to 40 is usual)")
    for flag, side in (("--height", height), ("--width", width)):
        if side < 8 or side % 8:
            raise ConfigError(f"{flag} {side}: must be a positive multiple of 8 (the VAE's scale), e.g. 1024")


def check_lora_files(loras) -> None:
    """ModelError naming the file when a (file, scale) LoRA is missing or no readable .safetensors."""
    for path, _ in loras:
        if not Path(path).is_file():
            raise ModelError(f"{path}: LoRA file not found")
        read_safetensors_header(Path(path))


def load_pair(base: Path, refiner: Path, loras=(), refiner_loras=(), device=None, progress: bool = True,
              dtype: torch.dtype = torch.float32):
    """(base pipeline, refiner pipeline) from saved models in `dtype`, with their (file, scale) LoRAs applied unmerged."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base_models = load_models(ModelConfig(pretrained=base, kind="base"), dtype=dtype)
    refiner_models = load_models(ModelConfig(pretrained=refiner, kind="refiner"), dtype=dtype)
    base_pipe = base_pipeline(base_models, base_models.unet, device, progress)
    refiner_pipe = refiner_pipeline(refiner_models, refiner_models.unet, device, progress)
    for pipe, files, kind in ((base_pipe, loras, "base"), (refiner_pipe, refiner_loras, "refiner")):
        for i, (path, _) in enumerate(files):
            check_lora_for(Path(path), kind)
            pipe.load_lora_weights(str(path), adapter_name=f"lora{i}")
        if files:  # each at its scale, unmerged
            pipe.set_adapters([f"lora{i}" for i in range(len(files))], adapter_weights=[s for _, s in files])
    return base_pipe, refiner_pipe


def check_lora_for(path: Path, kind: str) -> None:
    if not Path(path).is_file():
        raise ModelError(f"{path}: LoRA file not found")
    found = lora_kind(path)
    if found is not None and found != kind:
        flag = "--refiner-lora" if found == "refiner" else "--lora"
        raise ModelError(f"{path}: an SDXL {found} LoRA given for the {kind}; pass it with {flag}")


def render_two_stage(base: Path, refiner: Path, prompt: str, out: Path, *, loras=(), refiner_loras=(),
                     switch: float = 0.8, seed: int = 0, steps: int = 40, guidance_scale: float = 5.0,
                     height: int = 1024, width: int = 1024, negative_prompt: str = "", overwrite: bool = False,
                     dtype: str | None = None) -> Path:
    """`finetune sample BASE --refiner REFINER`: one PNG rendered in two stages.

    Raises:
        ConfigError: `out` exists without `overwrite` or is an input; steps, sizes or switch out of range.
        ModelError: a model or LoRA that is missing or unreadable.
    """
    check_output(Path(out), overwrite=overwrite,
                 inputs=[Path(base), Path(refiner), *(Path(p) for p, _ in (*loras, *refiner_loras))])
    check_sampling(steps, height, width)
    check_switch(switch)
    check_lora_files([*loras, *refiner_loras])
    weights_dtype = sampling_dtype(dtype, torch.cuda.is_available())  # fp16 on a GPU unless told
    base_pipe, refiner_pipe = load_pair(base, refiner, loras, refiner_loras, dtype=weights_dtype)
    image = two_stage(base_pipe, refiner_pipe, prompt, seed=seed, steps=steps, switch=switch,
                      guidance_scale=guidance_scale, height=height, width=width, negative_prompt=negative_prompt)
    with atomic_file(out) as tmp:
        image.save(tmp, format="PNG")
    return out
