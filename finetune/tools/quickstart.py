"""`finetune quickstart`: the whole path on the CPU, offline, in a few minutes.

Draws a small captioned image folder of several aspect ratios, builds the tiny SDXL-architecture
model, trains a LoRA on it through the real trainer, merges the LoRA into the model and renders a
sample with the merged model.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

from PIL import Image, ImageDraw

from finetune.config import load_config
from finetune.errors import ConfigError
from finetune.models.tiny import save_tiny_model
from finetune.tools.merge import merge_loras
from finetune.tools.sample import render_from_model

# The trainer (accelerate, diffusers) is imported when the quickstart runs: importing it takes seconds.

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 180, 60), "yellow": (230, 200, 40)}
SIZES = [(384, 256), (256, 384), (320, 320), (288, 448), (448, 288), (300, 300)]  # (height, width)

QUICKSTART_TOML = """\
# Written by `finetune quickstart`: the tiny model and the drawn images. Copy train_config.toml
# from the project for a real run.
[model]
pretrained = "{model}"

[dataset]
resolution = 256
min_side = 128
max_side = 512

[[dataset.subsets]]
folder = "images"

[training]
method = "lora"
max_steps = {steps}
batch_size = 2
learning_rate = 1e-3
mixed_precision = "no"
seed = 0

[lora]
rank = 8
alpha = 8

[checkpoint]
every_n_steps = 50
keep_last = 2

[output]
dir = "{output_dir}"
name = "{name}"
{extra}"""


def quickstart_config(steps: int, *, model: str = "tiny-sdxl", name: str = "quickstart_lora",
                      output_dir: str = "output", extra: str = "") -> str:
    """The quickstart's TOML for `steps` steps on the model folder `model`; `extra`: tables appended."""
    return QUICKSTART_TOML.format(steps=steps, model=model, name=name, output_dir=output_dir, extra=extra)


def draw_images(folder: Path, count: int = 12, seed: int = 0) -> list[Path]:
    """Draw `count` images of coloured shapes with a caption file beside each."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        height, width = SIZES[i % len(SIZES)]
        color_name, color = rng.choice(sorted(COLORS.items()))
        shape = SHAPES[i % len(SHAPES)]
        image = Image.new("RGB", (width, height), (245, 240, 230))
        draw = ImageDraw.Draw(image)
        side = min(height, width) // 2
        left, top = rng.randint(0, width - side), rng.randint(0, height - side)
        box = (left, top, left + side, top + side)
        if shape == "circle":
            draw.ellipse(box, fill=color)
        elif shape == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(left + side // 2, top), (left, top + side), (left + side, top + side)], fill=color)
        path = folder / f"{i:02d}_{color_name}_{shape}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(f"a {color_name} {shape}, flat colors, simple drawing", encoding="utf-8")
        paths.append(path)
    return paths


def claim_folder(out: Path) -> None:
    """The quickstart writes into a new or empty folder, or one an earlier quickstart made (whose run
    it replaces); any other folder is the user's and is refused untouched.

    Raises:
        ConfigError: `out` holds files the quickstart did not make.
    """
    if out.is_dir() and any(out.iterdir()):
        config = out / "train_config.toml"
        if not (config.is_file() and config.read_text(encoding="utf-8").startswith(QUICKSTART_TOML.splitlines()[0])):
            raise ConfigError(f"--out {out}: not empty and not made by an earlier quickstart; name a new folder")
        for made in ("output", "merged-sdxl"):  # the earlier quickstart's run, which this one replaces
            shutil.rmtree(out / made, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def prepare_workspace(out: Path, steps: int, models: dict, **config) -> tuple[Path, Path]:
    """Steps 1 and 2 of each quickstart: claim `out`, draw the images, build the tiny models (folder
    name -> function that writes it), and write the config (`quickstart_config(steps, **config)`).

    Returns:
        (the resolved `out`, the config file)
    """
    out = Path(out).resolve()
    claim_folder(out)
    print(f"[1/5] drawing images into {out / 'images'}")
    draw_images(out / "images")
    print(f"[2/5] building the tiny SDXL-architecture model{'s' * (len(models) > 1)} in "
          f"{', '.join(str(out / folder) for folder in models)}")
    for folder, save in models.items():
        save(out / folder)
    config_path = out / "train_config.toml"
    config_path.write_text(quickstart_config(steps, **config), encoding="utf-8")
    return out, config_path


def print_files(files: dict[str, Path]) -> None:
    width = max(len(k) for k in files)
    for role, path in files.items():
        print(f"  {role:<{width}}  {path}")


def run_quickstart(out: Path, steps: int = 120) -> dict[str, Path]:
    """Run the quickstart into `out`; returns the output files by role."""
    from finetune.train.recipe import train

    start = time.time()
    out, config_path = prepare_workspace(out, steps, {"tiny-sdxl": save_tiny_model})
    cfg = load_config(config_path)
    print(f"[3/5] training a LoRA ({steps} steps, CPU)")
    result = train(cfg)
    print("[4/5] merging the LoRA into the model")
    merged = out / "merged-sdxl"
    merge_loras(out / "tiny-sdxl", [(result.output_path, 1.0)], merged)
    print("[5/5] rendering a sample with the merged model")
    # claim_folder made `out` ours: an earlier quickstart's sample is replaced.
    sample = render_from_model(merged, "a red circle, flat colors, simple drawing", out / "sample.png",
                               seed=0, steps=20, height=256, width=256, overwrite=True)
    losses = result.losses
    print(f"\nquickstart finished in {time.time() - start:.0f} s; loss {losses[0]:.4f} (first step) -> "
          f"{sum(losses[-10:]) / len(losses[-10:]):.4f} (mean of last 10)")
    print("(the tiny model has random weights: the sample is noise; the point is that every stage ran offline)")
    files = {
        "config": config_path,
        "adapter (kohya keys: A1111/Forge/ComfyUI/diffusers)": result.output_path,
        "merged model (diffusers folder)": merged,
        "sample image": sample,
        "manifest": cfg.output.manifest_dir,
        "checkpoints": cfg.output.checkpoints_dir,
        "resolved config": cfg.output.dir / "config.resolved.toml",
    }
    print_files(files)
    return files
