"""`finetune quickstart --refiner`: the two-stage path on the CPU, offline, with the tiny base and refiner.

Draws the quickstart's images, builds the tiny pair (the refiner shares the base's VAE and bigG),
trains a refiner LoRA through the real trainer (timesteps [0, 200) by default), and renders one
prompt in two stages (base to 0.8, refiner from 0.8) without and with that LoRA.
"""

from __future__ import annotations

import time
from pathlib import Path

from finetune.config import load_config
from finetune.models.tiny import save_tiny_model
from finetune.models.tiny_refiner import save_tiny_refiner
from finetune.tools.quickstart import prepare_workspace, print_files
from finetune.tools.refine import render_two_stage

# The trainer (accelerate, diffusers) is imported when the quickstart runs: importing it takes seconds.

SWITCH = 0.8
PROMPT = "a red circle, flat colors, simple drawing"


def run_refiner_quickstart(out: Path, steps: int = 60) -> dict[str, Path]:
    """Run the refiner quickstart into `out`; returns the output files by role."""
    from finetune.train.recipe import train

    start = time.time()
    out, config_path = prepare_workspace(out, steps, {"tiny-sdxl": save_tiny_model, "tiny-refiner": save_tiny_refiner},
                                         model="tiny-refiner", name="refiner_lora")
    cfg = load_config(config_path)
    print(f"[3/5] training a refiner LoRA ({steps} steps, CPU)")
    result = train(cfg)
    # prepare_workspace claimed `out`: an earlier quickstart's samples are replaced.
    common = dict(switch=SWITCH, seed=0, steps=10, height=256, width=256, overwrite=True)
    print(f"[4/5] two-stage sample: base to {SWITCH}, refiner from {SWITCH}")
    plain = render_two_stage(out / "tiny-sdxl", out / "tiny-refiner", PROMPT, out / "two-stage.png", **common)
    print("[5/5] the same with the refiner LoRA")
    tuned = render_two_stage(out / "tiny-sdxl", out / "tiny-refiner", PROMPT, out / "two-stage-lora.png",
                             refiner_loras=[(result.output_path, 1.0)], **common)
    print(f"\nrefiner quickstart finished in {time.time() - start:.0f} s")
    files = {"config": config_path, "refiner LoRA": result.output_path, "two-stage sample": plain,
             "two-stage sample with the LoRA": tuned}
    print_files(files)
    return files
