"""SDXL pipelines over loaded parts (base, refiner, two stages, SDEdit) and rendering through them.

The base runs the first `switch` of the schedule (diffusers' `denoising_end`) and returns latents; the
refiner takes them at the same point (`denoising_start`) with the same scheduler and step count, so
at switch 0.8 and 1000 training steps it works on timesteps below 200, the part it was trained on.
Without a base, the refiner refines an image (SDEdit at `strength`). Training samples
(`finetune/train/samples.py`) and the `sample` command (`finetune/tools/sample.py`,
`finetune/tools/refine.py`) render through these.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from finetune.errors import ConfigError, ModelError

# diffusers is imported where a pipeline is built: importing it takes seconds.

NEGATIVE_AESTHETIC_SCORE = 2.5  # diffusers' default for the negative prompt (and ComfyUI's)


SAMPLING_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def sampling_dtype(name: str | None, cuda: bool) -> torch.dtype:
    """The precision `finetune sample` loads SDXL in: fp16 on a GPU unless told (half the memory of fp32;
    diffusers decodes with the VAE upcast to fp32, as SDXL's VAE config asks), fp32 on the CPU.

    Raises:
        ConfigError: fp16 asked for without a GPU, or an unknown name.
    """
    if name is None:
        return torch.float16 if cuda else torch.float32
    if name not in SAMPLING_DTYPES:
        raise ConfigError(f"--dtype {name}: choose one of {', '.join(SAMPLING_DTYPES)}")
    if name == "fp16" and not cuda:
        raise ConfigError("--dtype fp16 needs a CUDA GPU; on the CPU use bf16 or fp32")
    return SAMPLING_DTYPES[name]


def check_switch(switch: float) -> None:
    if not 0 < switch < 1:
        raise ModelError(f"--switch {switch}: the hand-off point must be between 0 and 1 (the paper's 0.8)")


def base_pipeline(models, unet, device, progress: bool = False):
    """A `StableDiffusionXLPipeline` over loaded base parts, with `unet` (possibly adapted) in place: the
    first stage of two, or the only one."""
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


def render(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance_scale: float,
           height: int, width: int, negative_prompt: str = "", progress: bool = False) -> list:
    """One PIL image per (prompt, seed), seeded on the CPU so images match across devices.

    With `progress`, a console bar counts denoising steps over all images ("sample 2/4").
    """
    images, total = [], len(prompts) * len(seeds)
    with tqdm(total=total * steps, desc="sampling", unit="step", disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        for prompt in prompts:
            for seed in seeds:
                bar.set_description(f"sample {len(images) + 1}/{total}")

                def on_step(pipeline, step, timestep, kwargs):
                    bar.update(1)
                    return kwargs

                generator = torch.Generator("cpu").manual_seed(seed)
                with torch.no_grad():
                    images.append(pipe(prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                                       guidance_scale=guidance_scale, height=height, width=width,
                                       generator=generator, callback_on_step_end=on_step).images[0])
    return images


def grid(images: list, columns: int, labels: list[str] | None = None):
    """Paste images (same size) into a grid, row-major; with `labels`, a caption strip under each tile."""
    width, height = images[0].size
    strip = 14 if labels else 0  # one line of the default bitmap font
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * width, rows * (height + strip)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for i, image in enumerate(images):
        x, y = (i % columns) * width, (i // columns) * (height + strip)
        sheet.paste(image, (x, y))
        if labels:
            draw.text((x + 2, y + height + 1), _fit(draw, labels[i], font, width - 4), fill="black", font=font)
    return sheet


def _fit(draw, text: str, font, width: int) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 1 else ""
    return text
