"""The trainer learns: loss at fixed noise drops, and a flat-colour LoRA pulls generations toward that colour."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from finetune.config import load_config

pytestmark = pytest.mark.slow

CONFIG = """
[model]
pretrained = "{model}"
[dataset]
resolution = 64
min_side = 64
max_side = 128
[[dataset.subsets]]
folder = "{images}"
[training]
max_steps = {steps}
batch_size = 4
learning_rate = 1e-2
mixed_precision = "no"
seed = 0
[lora]
rank = 16
alpha = 16
targets = "locon"
[checkpoint]
every_n_steps = 1000
[output]
dir = "out"
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A LoRA trained on 8 flat red images; the recipe and the fixed-noise loss before and after."""
    from finetune.train.recipe import Recipe, StopFlag
    from finetune.train.validation import validation_loss

    work = tmp_path_factory.mktemp("flat")
    for i in range(8):
        Image.new("RGB", (64, 64), (220, 20, 20)).save(work / f"{i}.png")
        (work / f"{i}.txt").write_text("a red square", encoding="utf-8")
    path = work / "c.toml"
    path.write_text(CONFIG.format(model=tiny_model_dir, images=work, steps=100), encoding="utf-8")
    run = Recipe(load_config(path), progress=False).setup()

    def fixed_loss():
        return validation_loss(run.bare_unet(), run.dataset, [200, 500, 800],
                               run.noise_scheduler, run.prediction_type, vae=run.models.vae,
                               text_encode=run.text_encode, device=run.accelerator.device, seed=0)

    before = fixed_loss()
    with StopFlag() as stop:
        run.train_loop(stop)
    return run, before, fixed_loss()


def test_training_lowers_the_loss_at_fixed_noise(trained):
    _, before, after = trained
    assert after < 0.8 * before


def test_flat_colour_lora_moves_generations_toward_the_colour(trained, tiny_model_dir):
    from diffusers import StableDiffusionXLPipeline

    run, _, _ = trained
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    red = torch.full((1, 3, 64, 64), -1.0)
    red[:, 0] = 220 / 127.5 - 1
    red[:, 1:] = 20 / 127.5 - 1
    with torch.no_grad():
        target = pipe.vae.encode(red).latent_dist.mean * pipe.vae.config.scaling_factor

    def generated():
        out = pipe("a red square", num_inference_steps=10, height=64, width=64, guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(0), output_type="latent")
        return out.images

    base = generated()
    run.write_weights(run.cfg.output.adapter_path)
    pipe.load_lora_weights(str(run.cfg.output.adapter_path))
    tuned = generated()
    assert torch.dist(tuned, target) < 0.8 * torch.dist(base, target)
