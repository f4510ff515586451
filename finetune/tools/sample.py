"""Render images: samples during training with the current weights, and from a saved model."""

from __future__ import annotations

from pathlib import Path

import torch


def sdxl_pipeline(models, unet, device):
    """A `StableDiffusionXLPipeline` over the loaded parts, with `unet` (possibly adapted) in place."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=models.vae, text_encoder=models.text_encoder, text_encoder_2=models.text_encoder_2,
        tokenizer=models.tokenizer, tokenizer_2=models.tokenizer_2, unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(models.noise_scheduler.config),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def render(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance_scale: float,
           height: int, width: int, negative_prompt: str = "") -> list:
    """One PIL image per (prompt, seed), seeded on the CPU so images match across devices."""
    images = []
    for prompt in prompts:
        for seed in seeds:
            generator = torch.Generator("cpu").manual_seed(seed)
            with torch.no_grad():
                images.append(pipe(prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                                   guidance_scale=guidance_scale, height=height, width=width,
                                   generator=generator).images[0])
    return images


def grid(images: list, columns: int):
    """Paste images (same size) into a grid, row-major."""
    from PIL import Image

    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * width, (i // columns) * height))
    return sheet


def render_training_samples(unet, models, cfg, step: int, device) -> list[Path]:
    """Samples for `cfg.sample.prompts` with the current weights: `<output>/samples/step-NNNNNN.png`."""
    from finetune.io import atomic_file

    was_training = unet.training
    unet.eval()
    parts = [models.vae, models.text_encoder, models.text_encoder_2]
    homes = [next(m.parameters()).device for m in parts]
    pipe = sdxl_pipeline(models, unet, device)
    size = cfg.dataset.resolution
    images = render(pipe, cfg.sample.prompts, cfg.sample.seeds, steps=cfg.sample.steps,
                    guidance_scale=cfg.sample.guidance_scale, height=cfg.sample.height or size,
                    width=cfg.sample.width or size, negative_prompt=cfg.sample.negative_prompt)
    for module, home in zip(parts, homes):
        module.to(home)  # back off the GPU if that is where caching left them
    unet.train(was_training)
    out = cfg.output.dir / "samples" / f"step-{step:06d}.png"
    with atomic_file(out) as tmp:
        grid(images, columns=len(cfg.sample.seeds)).save(tmp, format="PNG")
    return [out]


def log_sample_grids(tracker, paths: list[Path], step: int) -> None:
    """Send the sample grids to TensorBoard or wandb (Accelerate's tracker), beside the loss curves."""
    import numpy as np
    from PIL import Image

    images = [np.asarray(Image.open(path).convert("RGB")) for path in paths]  # (H, W, 3) uint8 each
    if tracker.name == "tensorboard":
        tracker.log_images({"samples": np.stack(images)}, step=step, dataformats="NHWC")
    else:
        tracker.log_images({"samples": images}, step=step)


def render_from_model(model_path: Path, prompt: str, out: Path, *, seed: int = 0, steps: int = 20,
                      guidance_scale: float = 5.0, height: int = 1024, width: int = 1024,
                      negative_prompt: str = "") -> Path:
    """Load a saved SDXL (diffusers folder or single file) and render one PNG."""
    from finetune.config import ModelConfig
    from finetune.io import atomic_file
    from finetune.models.load import load_models

    models = load_models(ModelConfig(pretrained=model_path))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = sdxl_pipeline(models, models.unet, device)
    image = render(pipe, [prompt], [seed], steps=steps, guidance_scale=guidance_scale, height=height, width=width,
                   negative_prompt=negative_prompt)[0]
    with atomic_file(out) as tmp:
        image.save(tmp, format="PNG")
    return out
