"""Shared by the trainer tests: a small training config on the tiny model and a folder of shapes."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from finetune.config import dump_config, load_config
from finetune.train.checkpoint import latest_checkpoint

from conftest import make_image

CONFIG = """
[model]
pretrained = "{model}"
[dataset]
resolution = 128
min_side = 64
max_side = 256
[[dataset.subsets]]
folder = "{images}"
[training]
max_steps = {steps}
batch_size = 2
learning_rate = 2e-3
mixed_precision = "no"
seed = 3
[lora]
rank = 4
alpha = 4
[checkpoint]
every_n_steps = {every}
keep_last = 5
[output]
dir = "out"
name = "lora"
"""


def write_config(folder: Path, model: Path, images: Path, steps: int = 8, every: int = 4, extra: str = "") -> Path:
    path = folder / "train.toml"
    path.write_text(CONFIG.format(model=model, images=images, steps=steps, every=every) + extra, encoding="utf-8")
    return path


def make_shapes_folder(folder: Path) -> Path:
    """Four captioned images of three aspect ratios (two buckets at 128²)."""
    for i, (h, w) in enumerate([(96, 160), (160, 96), (128, 128), (112, 144)]):
        make_image(folder / f"{i}.png", h, w, color=(200, 30 * i, 40))
        (folder / f"{i}.txt").write_text(f"a red drawing number {i}", encoding="utf-8")
    return folder


def assert_resolved_is_the_runs(run: Path) -> None:
    """`config.resolved.toml` holds the config the run trained with: it is the config saved with the run's
    last checkpoint, and reloading it gives that config again (no value that only means something before
    a reload)."""
    text = (run / "config.resolved.toml").read_text(encoding="utf-8")
    assert text == (latest_checkpoint(run / "checkpoints") / "config.toml").read_text(encoding="utf-8")
    assert dump_config(load_config(run / "config.resolved.toml")) == text


def adapter_tensors(path: Path) -> dict:
    return load_file(str(path))
