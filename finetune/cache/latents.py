"""The latent cache: each manifest row encoded once by the VAE at its bucket size, read back per sample."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from bucketing.image import load_bucket_image
from finetune.cache.build import run_build, store_dtype
from finetune.cache.keys import latent_key, vae_encode_dtype, vae_identity
from finetune.cache.store import CacheStats, ShardReader

RGB = tuple[int, int, int]


def latent_key_for_row(row: dict, vae_identity: str, dtype: str, store_std: bool,
                       alpha_color: Sequence[int] = (255, 255, 255)) -> str:
    """The cache key of one manifest row (`vae_identity` from `finetune.cache.vae_identity(vae)`)."""
    return latent_key(row["fingerprint"], row["bucket"], row["crop_top_left"], row["flip"],
                      vae_identity, dtype, store_std, alpha_color)


def latent_keys_for_manifest(manifest, vae, *, dtype: str = "fp16", store_std: bool = True,
                             alpha_color: Sequence[int] = (255, 255, 255)) -> list[str]:
    """One key per manifest row, in row order (row index -> key for `LatentCache.get`)."""
    vae_id = vae_identity(vae)
    columns = ("fingerprint", "bucket", "crop_top_left", "flip")
    # Column access is much faster than row dicts on a `datasets.Dataset`.
    values = zip(*(manifest[c] for c in columns))
    return [latent_key(fp, b, c, f, vae_id, dtype, store_std, alpha_color) for fp, b, c, f in values]


def build_latent_cache(manifest, vae, cache_dir: Path, *, dtype: str = "fp16", store_std: bool = True,
                       batch_size: int = 4, alpha_color: RGB = (255, 255, 255), accelerator=None,
                       progress: bool = True, shard_size: int = 256) -> CacheStats:
    """Encode every manifest row the cache lacks; reuse the rest.

    Stores `mean` (and `std` when `store_std`) of the VAE's latent distribution times its
    `scaling_factor`, shaped (4, H/8, W/8), in `dtype`. The VAE must already sit on its device.
    """
    out_dtype = store_dtype(dtype)
    keys = latent_keys_for_manifest(manifest, vae, dtype=dtype, store_std=store_std, alpha_color=alpha_color)
    first_row = {}
    for i, key in enumerate(keys):
        first_row.setdefault(key, i)

    def encode(missing: list[str]) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        rows = {key: manifest[first_row[key]] for key in missing}
        for batch in _prefetched(_bucket_batches(rows, batch_size), alpha_color):
            keys_in_batch, pixels = zip(*batch)
            mean, std = encode_latents(vae, torch.stack(pixels))
            for j, key in enumerate(keys_in_batch):
                entry = {"mean": mean[j].to(out_dtype)}
                if store_std:
                    entry["std"] = std[j].to(out_dtype)
                yield key, entry

    return run_build("latents", cache_dir, keys, encode, accelerator=accelerator, shard_size=shard_size,
                     progress=progress, unit="img")


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) pixels in [-1, 1] -> scaled latent mean and std, each (B, 4, H/8, W/8), fp32."""
    encode_dtype = vae_encode_dtype(vae)
    weights_dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    if encode_dtype != weights_dtype:
        vae.to(encode_dtype)  # upcast for the fp16 overflow; restored below
    try:
        dist = vae.encode(pixels.to(device, encode_dtype)).latent_dist
        scale = vae.config.scaling_factor
        return dist.mean.float() * scale, dist.std.float() * scale
    finally:
        if encode_dtype != weights_dtype:
            vae.to(weights_dtype)


def to_pixels(image) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) float tensor in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_row_pixels(row: dict, alpha_color: RGB) -> torch.Tensor:
    image = load_bucket_image(Path(row["root"]) / row["path"], tuple(row["bucket"]), tuple(row["crop_top_left"]),
                              row["flip"], tuple(alpha_color))
    return to_pixels(image)


def _bucket_batches(rows: dict[str, dict], batch_size: int) -> list[list[tuple[str, dict]]]:
    """Rows grouped by bucket (one shape per VAE call), in batches of `batch_size`."""
    by_bucket: dict[tuple, list] = defaultdict(list)
    for key, row in rows.items():
        by_bucket[tuple(row["bucket"])].append((key, row))
    return [items[i:i + batch_size] for _, items in sorted(by_bucket.items())
            for i in range(0, len(items), batch_size)]


def _prefetched(batches: list[list[tuple[str, dict]]], alpha_color: RGB) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Load each batch's images in threads (decode and resize release the GIL) while the VAE works on the last."""
    workers = max(1, min(8, (os.cpu_count() or 1)))
    with ThreadPoolExecutor(workers) as pool:
        def submit(batch):
            return [(key, pool.submit(load_row_pixels, row, alpha_color)) for key, row in batch]

        pending = submit(batches[0]) if batches else None
        for i in range(len(batches)):
            current = pending
            pending = submit(batches[i + 1]) if i + 1 < len(batches) else None
            yield [(key, future.result()) for key, future in current]


def sample_latents(mean: torch.Tensor, std: torch.Tensor | None, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """A draw from the cached latent distribution (mean + std * noise; the mean when no std is stored), fp32."""
    if std is None:
        return mean.float()
    device = generator.device if generator is not None else mean.device
    noise = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32).to(mean.device)
    return mean.float() + std.float() * noise


class LatentCache:
    """Read side for training: `get(key)` -> {"mean": (4, h, w), "std": (4, h, w) when stored}."""

    def __init__(self, cache_dir: Path, in_memory: bool = False, verify: bool = True):
        self.reader = ShardReader(cache_dir, in_memory=in_memory, verify=verify)

    def __contains__(self, key: str) -> bool:
        return key in self.reader

    def __len__(self) -> int:
        return len(self.reader)

    def get(self, key: str) -> dict[str, torch.Tensor]:
        return self.reader.get(key)
