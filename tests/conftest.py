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


@pytest.fixture(scope="session")
def tiny_refiner_dir(tmp_path_factory) -> Path:
    """The tiny SDXL refiner (bigG only, five-value conditioning) as a diffusers folder. Treat as read-only."""
    from finetune.models.tiny_refiner import save_tiny_refiner

    return save_tiny_refiner(tmp_path_factory.mktemp("models") / "tiny-refiner")


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


def make_tiny_unet(seed: int = 0):
    """Only the tiny SDXL UNet (no VAE, no text encoders), seeded: for tests of one UNet step."""
    import torch
    from diffusers import UNet2DConditionModel

    from finetune.models.tiny import tiny_unet_config

    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config())


def unet_inputs(unet, height: int = 16, width: int = 16, batch: int = 1, device: str = "cpu", seed: int = 0):
    """(latents, conditioning kwargs) for one UNet call: random embeddings, micro-conditioning of the shape."""
    import torch

    g = torch.Generator().manual_seed(seed)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    side = [height * 8.0, width * 8.0]
    latents = torch.randn(batch, 4, height, width, generator=g).to(device)
    cond = {"encoder_hidden_states": torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g).to(device),
            "added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled, generator=g).to(device),
                                  "time_ids": torch.tensor([side + [0.0, 0.0] + side] * batch, device=device)}}
    return latents, cond
