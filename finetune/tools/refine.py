"""Sampling with the SDXL refiner as the paper does: the base denoises to the switch, the refiner finishes.

The base runs the first `switch` of the schedule (diffusers' `denoising_end`) and returns latents; the
refiner takes them at the same point (`denoising_start`) with the same scheduler and step count, so
at switch 0.8 and 1000 training steps it works on timesteps below 200, the part it was trained on.
Without a base, the refiner refines an image (SDEdit at `strength`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from bucketing.image import load_bucket_image
from bucketing.manifest import load_manifest
from finetune.adapters.metadata_read import lora_kind
from finetune.config import ModelConfig
from finetune.errors import ConfigError, ModelError
from finetune.io import atomic_file, check_output, read_safetensors_header
from finetune.models.load import load_models

# diffusers is imported where a pipeline is built: importing it takes seconds.

NEGATIVE_AESTHETIC_SCORE = 2.5  # diffusers' default for the negative prompt (and ComfyUI's)
MAX_STEPS = 1000  # the noise schedule's length: diffusers' schedulers refuse more


def check_sampling(steps: int, height: int, width: int) -> None:
    """ConfigError naming the option when a render cannot run: called before any model is loaded."""
    if not 1 <= steps <= MAX_STEPS:
        raise ConfigError(f"--steps {steps}: must be between 1 and {MAX_STEPS} (20 to 40 is usual)")
    for flag, side in (("--height", height), ("--width", width)):
        if side < 8 or side % 8:
            raise ConfigError(f"{flag} {side}: must be a positive multiple of 8 (the VAE's scale), e.g. 1024")


def check_switch(switch: float) -> None:
    if not 0 < switch < 1:
        raise ModelError(f"--switch {switch}: the hand-off point must be between 0 and 1 (the paper's 0.8)")


def check_lora_files(loras) -> None:
    """ModelError naming the file when a (file, scale) LoRA is missing or no readable .safetensors."""
    for path, _ in loras:
        if not Path(path).is_file():
            raise ModelError(f"{path}: LoRA file not found")
        read_safetensors_header(Path(path))


def refiner_pipeline(models, unet, device, progress: bool = False):
    """A `StableDiffusionXLImg2ImgPipeline` over loaded refiner parts, with `unet` (possibly adapted) in place."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    if models.kind != "refiner":
        raise ModelError(f"{models.source_path}: this is an SDXL base where a refiner is expected; "
                         "pass the refiner (one bigG text encoder, five-value micro-conditioning)")
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=models.vae, text_encoder=None, text_encoder_2=models.text_encoder_2, tokenizer=None,
        tokenizer_2=models.tokenizer_2, unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(models.noise_scheduler.config),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )
    pipe.set_progress_bar_config(disable=not progress)
    return pipe.to(device)


def base_pipeline(models, unet, device, progress: bool = False):
    """A `StableDiffusionXLPipeline` over loaded base parts, with `unet` (possibly adapted) in place: the
    first stage here, the only one in tools.sample (which imports this module, not the reverse)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    if models.kind != "base":
        raise ModelError(f"{models.source_path}: this is an SDXL refiner where the base is expected; "
                         "pass the base model first and the refiner with --refiner")
    pipe = StableDiffusionXLPipeline(
        vae=models.vae, text_encoder=models.text_encoder, text_encoder_2=models.text_encoder_2,
        tokenizer=models.tokenizer, tokenizer_2=models.tokenizer_2, unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(models.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=not progress)
    return pipe.to(device)


def two_stage(base_pipe, refiner_pipe, prompt: str, *, seed: int, steps: int, switch: float, guidance_scale: float,
              height: int, width: int, negative_prompt: str = "", aesthetic_score: float = 6.0,
              output_type: str = "pil"):
    """One PIL image (or with output_type "latent" the refined latents): base to `switch`, refiner after."""
    check_switch(switch)
    generator = torch.Generator("cpu").manual_seed(seed)
    negative = negative_prompt or None
    with torch.no_grad():
        latents = base_pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance_scale,
                            height=height, width=width, denoising_end=switch, output_type="latent",
                            generator=generator).images  # (1, 4, H/8, W/8), noisy at the switch
        return refiner_pipe(prompt, negative_prompt=negative, image=latents, num_inference_steps=steps,
                            guidance_scale=guidance_scale, denoising_start=switch, generator=generator,
                            aesthetic_score=aesthetic_score, negative_aesthetic_score=NEGATIVE_AESTHETIC_SCORE,
                            output_type=output_type).images[0]


def refine_image(refiner_pipe, prompt: str, image, *, seed: int, steps: int, strength: float, guidance_scale: float,
                 negative_prompt: str = "", aesthetic_score: float = 6.0):
    """SDEdit: noise `image` to `strength` of the schedule and let the refiner denoise it."""
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        return refiner_pipe(prompt, negative_prompt=negative_prompt or None, image=image, strength=strength,
                            num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                            aesthetic_score=aesthetic_score,
                            negative_aesthetic_score=NEGATIVE_AESTHETIC_SCORE).images[0]


def load_pair(base: Path, refiner: Path, loras=(), refiner_loras=(), device=None, progress: bool = True):
    """(base pipeline, refiner pipeline) from saved models, with their (file, scale) LoRAs applied unmerged."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base_models = load_models(ModelConfig(pretrained=base, kind="base"))
    refiner_models = load_models(ModelConfig(pretrained=refiner, kind="refiner"))
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
                     height: int = 1024, width: int = 1024, negative_prompt: str = "", overwrite: bool = False) -> Path:
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
    base_pipe, refiner_pipe = load_pair(base, refiner, loras, refiner_loras)
    image = two_stage(base_pipe, refiner_pipe, prompt, seed=seed, steps=steps, switch=switch,
                      guidance_scale=guidance_scale, height=height, width=width, negative_prompt=negative_prompt)
    with atomic_file(out) as tmp:
        image.save(tmp, format="PNG")
    return out


def render_refiner_samples(unet, models, cfg, device, progress: bool = False) -> list:
    """A refiner run's training samples: after `sample.base`'s first stage, or refining the dataset's first image."""
    pipe = refiner_pipeline(models, unet, device, progress)
    size = cfg.dataset.resolution
    height, width = cfg.sample.height or size, cfg.sample.width or size
    sample = cfg.sample
    if sample.base is not None:
        base_models = load_models(ModelConfig(pretrained=sample.base, kind="base"))
        base_pipe = base_pipeline(base_models, base_models.unet, device, progress)
        return [two_stage(base_pipe, pipe, prompt, seed=seed, steps=sample.steps, switch=sample.switch,
                          guidance_scale=sample.guidance_scale, height=height, width=width,
                          negative_prompt=sample.negative_prompt)
                for prompt in sample.prompts for seed in sample.seeds]
    row = load_manifest(cfg.output.manifest_dir)[0]
    image = load_bucket_image(Path(row["root"]) / row["path"], tuple(row["bucket"]), tuple(row["crop_top_left"]),
                              False)
    return [refine_image(pipe, prompt, image, seed=seed, steps=sample.steps, strength=sample.strength,
                         guidance_scale=sample.guidance_scale, negative_prompt=sample.negative_prompt)
            for prompt in sample.prompts for seed in sample.seeds]
