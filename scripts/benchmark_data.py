"""The benchmark's data rows: bucket planning of synthetic image folders and latent cache builds (images/s)."""

from __future__ import annotations

import time
from pathlib import Path

import torch


def make_synthetic_folder(folder: Path, count: int, max_side: int = 160) -> None:
    """`count` small, distinct PNGs of many aspect ratios (distinct bytes: no duplicates to drop)."""
    import random

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        h, w = rng.randint(max_side // 4, max_side), rng.randint(max_side // 4, max_side)
        info = PngInfo()
        info.add_text("id", str(i))
        Image.new("RGB", (w, h), (i % 256, (i // 256) % 256, 90)).save(folder / f"{i:06d}.png", pnginfo=info)
        (folder / f"{i:06d}.txt").write_text(f"synthetic image {i % 50}", encoding="utf-8")


def planning_throughput(count: int, work: Path) -> dict:
    """Bucket planning of `count` images: first build (validates, decodes each file once) and re-plan (headers only)."""
    from bucketing.manifest import BuildOptions, SubsetSpec, build_manifest

    folder = work / "images"
    make_synthetic_folder(folder, count)
    options = BuildOptions(resolution=1024)
    start = time.perf_counter()
    build_manifest([SubsetSpec(folder=folder)], options, work_dir=work / "plan")
    first = time.perf_counter() - start
    start = time.perf_counter()
    result = build_manifest([SubsetSpec(folder=folder)], options, work_dir=work / "plan")
    again = time.perf_counter() - start
    return {"row": "bucket_planning", "images": len(result.dataset), "first_build_images_per_s": round(count / first, 1),
            "replan_images_per_s": round(count / again, 1)}


def cache_throughput(count: int, work: Path, device: torch.device) -> dict:
    """Latent cache build for `count` images with the tiny model's VAE (full-size VAE on a GPU)."""
    from diffusers import AutoencoderKL

    from bucketing.manifest import BuildOptions, SubsetSpec, build_manifest
    from finetune.cache import build_latent_cache
    from finetune.models.configs import sdxl_vae_config
    from finetune.models.tiny import tiny_vae_config

    folder = work / "cache-images"
    make_synthetic_folder(folder, count, max_side=512)
    tiny = device.type != "cuda"
    options = BuildOptions(resolution=256 if tiny else 1024, min_side=128 if tiny else 512)
    manifest = build_manifest([SubsetSpec(folder=folder)], options, work_dir=work / "cache-plan").dataset
    config = tiny_vae_config() if tiny else {k: v for k, v in sdxl_vae_config().items() if not k.startswith("_")}
    with torch.device(device):
        vae = AutoencoderKL(**config).eval()
    stats = build_latent_cache(manifest, vae, work / "cache", batch_size=4, progress=False)
    return {"row": "latent_cache_build", "model": "tiny" if tiny else "sdxl-vae", "resolution": options.resolution,
            "images": stats.encoded, "images_per_s": round(stats.items_per_second, 2)}


def data_rows(planning_images: int, cache_images: int, device: torch.device) -> list[dict]:
    """The bucket-planning row and the latent-cache row, in a temporary folder."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return [planning_throughput(planning_images, Path(tmp)), cache_throughput(cache_images, Path(tmp), device)]
