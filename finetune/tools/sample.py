"""Render images: samples during training with the current weights, and from a saved model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file
from tqdm.auto import tqdm

from finetune.adapters.embedding_files import split_bundled
from finetune.adapters.embeddings import expand_prompt, use_real_eos
from finetune.config import ModelConfig
from finetune.errors import ModelError
from finetune.io import atomic_file, check_output
from finetune.models.load import load_models
from finetune.tools.refine import base_pipeline, check_lora_files, check_sampling, render_refiner_samples


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


def render_training_samples(unet, models, cfg, step: int, device, progress: bool = True, words=None) -> list[Path]:
    """Samples for `cfg.sample.prompts` with the current weights: `<output>/samples/step-NNNNNN.png`.

    `words` (NewWords): multi-vector words are written out here, as in training (diffusers' own
    expansion misses tokens with capitals, which its tokenizer lower-cases).
    """
    was_training = unet.training
    unet.eval()
    parts = [models.vae, *models.text_encoders]
    homes = [next(m.parameters()).device for m in parts]
    size = cfg.dataset.resolution
    print(f"step {step}: rendering {len(cfg.sample.prompts) * len(cfg.sample.seeds)} samples "
          f"({cfg.sample.steps} steps each) into {cfg.output.dir / 'samples'}", flush=True)
    if models.kind == "refiner":
        images = render_refiner_samples(unet, models, cfg, device, progress=progress)
    else:
        pipe = base_pipeline(models, unet, device)
        expand = words.expand if words is not None else str
        images = render(pipe, [expand(p) for p in cfg.sample.prompts], cfg.sample.seeds, steps=cfg.sample.steps,
                        guidance_scale=cfg.sample.guidance_scale, height=cfg.sample.height or size,
                        width=cfg.sample.width or size, negative_prompt=expand(cfg.sample.negative_prompt),
                        progress=progress)
    for module, home in zip(parts, homes):
        module.to(home)  # back off the GPU if that is where caching left them
    unet.train(was_training)
    out = cfg.output.dir / "samples" / f"step-{step:06d}.png"
    with atomic_file(out) as tmp:
        labels = [f"{prompt} | step {step} | seed {seed}" for prompt in cfg.sample.prompts for seed in cfg.sample.seeds]
        grid(images, columns=len(cfg.sample.seeds), labels=labels).save(tmp, format="PNG")
    return [out]


def log_sample_grids(tracker, paths: list[Path], step: int) -> None:
    """Send the sample grids to TensorBoard or wandb (Accelerate's tracker), beside the loss curves."""
    images = [np.asarray(Image.open(path).convert("RGB")) for path in paths]  # (H, W, 3) uint8 each
    if tracker.name == "tensorboard":
        tracker.log_images({"samples": np.stack(images)}, step=step, dataformats="NHWC")
    else:
        tracker.log_images({"samples": images}, step=step)


def render_from_model(model_path: Path, prompt: str, out: Path, *, seed: int = 0, steps: int = 20,
                      guidance_scale: float = 5.0, height: int = 1024, width: int = 1024,
                      negative_prompt: str = "", loras: list[tuple[Path, float]] = (), progress: bool = True,
                      overwrite: bool = False) -> Path:
    """Load a saved SDXL (diffusers folder or single file), apply `loras` (file, scale) without merging,
    and render one PNG.

    Raises:
        ConfigError: `out` exists without `overwrite` or is an input; steps or sizes out of range
            (all checked before any model is loaded).
        ModelError: the model or a LoRA is missing or unreadable.
    """
    check_output(Path(out), overwrite=overwrite, inputs=[Path(model_path), *(Path(p) for p, _ in loras)])
    check_sampling(steps, height, width)
    check_lora_files(loras)
    if progress:
        print(f"loading {model_path}", flush=True)
    models = load_models(ModelConfig(pretrained=model_path))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = base_pipeline(models, models.unet, device)  # a refiner here: one line naming --refiner
    words = apply_loras(pipe, loras)
    image = render(pipe, [expand_prompt(prompt, words)], [seed], steps=steps, guidance_scale=guidance_scale,
                   height=height, width=width, negative_prompt=negative_prompt, progress=progress)[0]
    with atomic_file(out) as tmp:
        image.save(tmp, format="PNG")
    return out


def apply_loras(pipe, loras) -> list:
    """Load each LoRA file (kohya or diffusers keys) into the pipeline at its scale, unmerged; the
    words a pivotal LoRA bundles join both tokenizers and text encoders. Returns those words."""
    names, scales, words = [], [], []
    check_lora_files(loras)
    for i, (path, scale) in enumerate(loras):
        name = f"lora{i}"
        state, bundled = split_bundled(load_file(str(path)))
        try:
            pipe.load_lora_weights(state, adapter_name=name)  # diffusers refuses the bundle's keys
        except (ValueError, KeyError, RuntimeError) as err:
            raise ModelError(f"{path}: diffusers could not load it as an SDXL LoRA ({err}); is it a LoRA "
                             "for this model?") from None
        for token, vectors in bundled.items():
            for key, encoder, tokenizer in (("clip_l", pipe.text_encoder, pipe.tokenizer),
                                            ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):
                pipe.load_textual_inversion(vectors[key], token=token, text_encoder=encoder, tokenizer=tokenizer)
                use_real_eos(encoder)  # SDXL's legacy eos id would pool at the new token
            words.append(SimpleNamespace(token=token, vectors=vectors["clip_l"].shape[0]))
        names.append(name)
        scales.append(scale)
    if names:
        pipe.set_adapters(names, adapter_weights=scales)
    return words
