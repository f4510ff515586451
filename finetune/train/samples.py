"""Training samples: the sample grid rendered with the current weights, and its trip to the tracker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from bucketing.image import load_bucket_image
from bucketing.manifest import load_manifest
from finetune.config import ModelConfig, OutputConfig, SampleConfig
from finetune.io import atomic_file
from finetune.models.load import load_models
from finetune.sampling.pipelines import base_pipeline, grid, refine_image, refiner_pipeline, render, two_stage


def render_training_samples(unet, models, sample: SampleConfig, output: OutputConfig, resolution: int, step: int,
                            device, progress: bool = True, words=None) -> list[Path]:
    """Samples for `sample.prompts` with the current weights: `<output.dir>/samples/step-NNNNNN.png`.

    `resolution` (dataset.resolution) is the side when `sample.height`/`width` are unset. `words`
    (NewWords): multi-vector words are written out here, as in training (diffusers' own expansion
    misses tokens with capitals, which its tokenizer lower-cases).
    """
    was_training = unet.training
    unet.eval()
    parts = [models.vae, *models.text_encoders]
    homes = [next(m.parameters()).device for m in parts]
    height, width = sample.height or resolution, sample.width or resolution
    print(f"step {step}: rendering {len(sample.prompts) * len(sample.seeds)} samples "
          f"({sample.steps} steps each) into {output.dir / 'samples'}", flush=True)
    if models.kind == "refiner":
        images = render_refiner_samples(unet, models, sample, height, width, output.manifest_dir, device,
                                        progress=progress)
    else:
        pipe = base_pipeline(models, unet, device)
        expand = words.expand if words is not None else str
        images = render(pipe, [expand(p) for p in sample.prompts], sample.seeds, steps=sample.steps,
                        guidance_scale=sample.guidance_scale, height=height, width=width,
                        negative_prompt=expand(sample.negative_prompt), progress=progress)
    for module, home in zip(parts, homes):
        module.to(home)  # back off the GPU if that is where caching left them
    unet.train(was_training)
    out = output.dir / "samples" / f"step-{step:06d}.png"
    with atomic_file(out) as tmp:
        labels = [f"{prompt} | step {step} | seed {seed}" for prompt in sample.prompts for seed in sample.seeds]
        grid(images, columns=len(sample.seeds), labels=labels).save(tmp, format="PNG")
    return [out]


def render_refiner_samples(unet, models, sample: SampleConfig, height: int, width: int, manifest_dir: Path, device,
                           progress: bool = False) -> list:
    """A refiner run's training samples: after `sample.base`'s first stage, or refining the run's first image."""
    pipe = refiner_pipeline(models, unet, device, progress)
    if sample.base is not None:
        base_models = load_models(ModelConfig(pretrained=sample.base, kind="base"))
        base_pipe = base_pipeline(base_models, base_models.unet, device, progress)
        return [two_stage(base_pipe, pipe, prompt, seed=seed, steps=sample.steps, switch=sample.switch,
                          guidance_scale=sample.guidance_scale, height=height, width=width,
                          negative_prompt=sample.negative_prompt)
                for prompt in sample.prompts for seed in sample.seeds]
    row = load_manifest(manifest_dir)[0]
    image = load_bucket_image(Path(row["root"]) / row["path"], tuple(row["bucket"]), tuple(row["crop_top_left"]),
                              False)
    return [refine_image(pipe, prompt, image, seed=seed, steps=sample.steps, strength=sample.strength,
                         guidance_scale=sample.guidance_scale, negative_prompt=sample.negative_prompt)
            for prompt in sample.prompts for seed in sample.seeds]


def log_sample_grids(tracker, paths: list[Path], step: int) -> None:
    """Send the sample grids to TensorBoard or wandb (Accelerate's tracker), beside the loss curves."""
    images = [np.asarray(Image.open(path).convert("RGB")) for path in paths]  # (H, W, 3) uint8 each
    if tracker.name == "tensorboard":
        tracker.log_images({"samples": np.stack(images)}, step=step, dataformats="NHWC")
    else:
        tracker.log_images({"samples": images}, step=step)
