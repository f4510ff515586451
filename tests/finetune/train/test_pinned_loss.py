"""Three optimizer steps of the tiny model give the recorded losses: a change to the step's math shows up here.

The numbers were recorded with torch 2.13.0 (CPU). They hold to 1e-5 relative across x86 CPUs; a change
to noise, timesteps, targets, weighting, conditioning or the optimizer moves them by far more. If a
change is meant to move them, record the new ones and say why in the commit.
"""

from __future__ import annotations

import pytest
import torch

from finetune.config import load_config
from finetune.train.recipe import train
from trainer_runs import write_config

PINNED = {
    "lora": [1.1602890491485596, 1.089595079421997, 1.1482579708099365],
    "full": [1.1602890491485596, 1.0750901699066162, 1.1131163835525513],
}


@pytest.mark.slow
@pytest.mark.skipif(not torch.__version__.startswith("2.13."), reason="losses recorded with torch 2.13")
@pytest.mark.parametrize("method", ["lora", "full"])
def test_three_steps_give_the_recorded_losses(tmp_path, tiny_model_dir, shapes_folder, method):
    overrides = ["training.gradient_accumulation_steps=2", "training.batch_size=1"]
    if method == "full":
        overrides += ["training.method=full", "training.learning_rate=1e-4"]
    cfg = load_config(write_config(tmp_path, tiny_model_dir, shapes_folder, steps=3, every=100), overrides)
    losses = train(cfg, progress=False).losses
    assert losses == pytest.approx(PINNED[method], rel=1e-5)
