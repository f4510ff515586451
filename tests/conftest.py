"""Shared fixtures: the tiny SDXL-architecture model and images made on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach for the hub, and a stray download attempt fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny SDXL model as a diffusers folder, built once per test session. Treat as read-only."""
    from finetune.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl")


def make_image(path: Path, height: int, width: int, color=(200, 40, 40), mode: str = "RGB", **save_kwargs) -> Path:
    """Write a solid image with a darker square in it (so crops and flips are visible) and return its path."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), color)
    ImageDraw.Draw(image).rectangle([width // 8, height // 8, width // 3, height // 3], fill=(20, 20, 20))
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_kwargs)
    return path


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Six captioned images of three aspect ratios: landscape, portrait, square."""
    folder = tmp_path / "images"
    sizes = [(96, 160), (160, 96), (128, 128), (100, 150), (150, 100), (120, 120)]
    colors = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (40, 200, 200), (200, 40, 200)]
    for i, ((h, w), color) in enumerate(zip(sizes, colors)):
        make_image(folder / f"img{i}.png", h, w, color)
        (folder / f"img{i}.txt").write_text(f"a drawing, shape {i}", encoding="utf-8")
    return folder
