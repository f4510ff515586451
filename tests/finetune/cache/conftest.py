"""Fixtures for the cache tests: a tiny VAE, tiny text encoders, and a small manifest of images."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image

# (height, width) of each test image; images are made at their bucket size, so the loader's resize
# is the identity and an independent reference needs only open + flip.
SIZES = [(64, 64), (64, 128), (128, 64), (64, 64)]


def _make_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    from finetune.models.tiny import tiny_vae_config

    torch.manual_seed(seed)
    return AutoencoderKL(**tiny_vae_config()).eval()


def fingerprint(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}-{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"


def manifest_rows(root: Path, flip: bool = False) -> list[dict]:
    rows = []
    for i, (h, w) in enumerate(SIZES):
        path = root / f"img{i}.png"
        for flipped in ([False, True] if flip else [False]):
            rows.append({
                "path": path.name, "root": str(root), "caption": f"caption {i}", "original_size": [h, w],
                "bucket": [h, w], "crop_top_left": [0, 0], "flip": flipped, "subset": "main", "repeats": 1,
                "is_regularization": False, "fingerprint": fingerprint(path), "mask_path": "",
            })
    return rows


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "images"
    colors = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (120, 120, 30)]
    for i, ((h, w), color) in enumerate(zip(SIZES, colors)):
        make_image(root / f"img{i}.png", h, w, color)
    return root


def _make_manifest(root: Path, flip: bool = False):
    import datasets

    return datasets.Dataset.from_list(manifest_rows(root, flip))


def _reference_pixels(path: Path, flip: bool) -> torch.Tensor:
    """(3, H, W) in [-1, 1], computed without the code under test."""
    image = Image.open(path).convert("RGB")
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


@pytest.fixture(autouse=True)
def bucket_image_loader(monkeypatch):
    """Use bucketing.image.load_bucket_image when it exists; until then, an equivalent for bucket-sized images."""
    try:
        import bucketing.image  # noqa: F401
    except ImportError:
        import finetune.cache.latents as latents

        def load_row_pixels(row, alpha_color):
            return _reference_pixels(Path(row["root"]) / row["path"], row["flip"])

        monkeypatch.setattr(latents, "load_row_pixels", load_row_pixels)


@pytest.fixture(scope="session")
def text_models():
    """(tokenizers, text_encoders) of the tiny pipeline, built once."""
    from finetune.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    return (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder.eval(), pipe.text_encoder_2.eval())


# Helpers as fixtures: test modules are imported by path (importlib mode) and cannot import each other.
@pytest.fixture
def make_vae():
    return _make_vae


@pytest.fixture
def make_manifest():
    return _make_manifest


@pytest.fixture
def reference_pixels():
    return _reference_pixels
