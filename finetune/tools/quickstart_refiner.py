"""`finetune quickstart --refiner`: the two-stage path on the CPU, offline, with the tiny base and refiner.

Draws the quickstart's images, builds the tiny pair (the refiner shares the base's VAE and bigG),
trains a refiner LoRA through the real trainer (timesteps [0, 200) by default), and renders one
prompt in two stages (base to 0.8, refiner from 0.8) without and with that LoRA.
"""

from __future__ import annotations

import time
from pathlib import Path

from finetune.tools.quickstart import QUICKSTART_TOML, claim_folder, draw_images

SWITCH = 0.8
PROMPT = "a red circle, flat colors, simple drawing"


def run_refiner_quickstart(out: Path, steps: int = 60) -> dict[str, Path]:
    """Run the refiner quickstart into `out`; returns the output files by role."""
    from finetune.config import load_config
    from finetune.models.tiny_refiner import save_tiny_refiner
    from finetune.models.tiny import save_tiny_model
    from finetune.tools.refine import render_two_stage
    from finetune.train.recipe import train

    start = time.time()
    out = Path(out).resolve()
    claim_folder(out)
    print(f"[1/5] drawing images into {out / 'images'}")
    draw_images(out / "images")
    print(f"[2/5] building the tiny SDXL base and refiner in {out}")
    save_tiny_model(out / "tiny-sdxl")
    save_tiny_refiner(out / "tiny-refiner")
    config_path = out / "train_config.toml"
    toml = QUICKSTART_TOML.format(steps=steps).replace('pretrained = "tiny-sdxl"', 'pretrained = "tiny-refiner"')
    config_path.write_text(toml.replace('name = "quickstart_lora"', 'name = "refiner_lora"'), encoding="utf-8")
    cfg = load_config(config_path)
    print(f"[3/5] training a refiner LoRA ({steps} steps, CPU)")
    result = train(cfg)
    common = dict(switch=SWITCH, seed=0, steps=10, height=256, width=256)
    print(f"[4/5] two-stage sample: base to {SWITCH}, refiner from {SWITCH}")
    plain = render_two_stage(out / "tiny-sdxl", out / "tiny-refiner", PROMPT, out / "two-stage.png", **common)
    print("[5/5] the same with the refiner LoRA")
    tuned = render_two_stage(out / "tiny-sdxl", out / "tiny-refiner", PROMPT, out / "two-stage-lora.png",
                             refiner_loras=[(result.output_path, 1.0)], **common)
    print(f"\nrefiner quickstart finished in {time.time() - start:.0f} s")
    files = {"config": config_path, "refiner LoRA": result.output_path, "two-stage sample": plain,
             "two-stage sample with the LoRA": tuned}
    width = max(len(k) for k in files)
    for role, path in files.items():
        print(f"  {role:<{width}}  {path}")
    return files
