"""The caches a run needs, built (or reused) before training: lookups for the data loader, and `finetune cache`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from bucketing.manifest import load_manifest
from finetune.adapters.embeddings import mentions
from finetune.cache.latents import LatentCache, build_latent_cache, latent_keys_for_manifest
from finetune.cache.text import TextCache, build_text_cache
from finetune.config import CacheConfig, DatasetConfig, EmbeddingConfig
from finetune.dataset import build_dataset
from finetune.models.load import load_models


def prepare_caches(manifest, models, accelerator, cache_cfg: CacheConfig, cache_dir: Path, dataset: DatasetConfig,
                   embeddings: Sequence[EmbeddingConfig] = (), progress: bool = True):
    """Build (or reuse) the latent and text caches under `cache_dir`; return row/caption lookups and build stats.

    `dataset` gives the alpha colour and how captions are encoded; captions naming an `embeddings`
    word are left out (they are encoded every step).

    Returns:
        (latent_lookup or None, text_lookup or None, [CacheStats...])
    """
    stats = []
    latent_lookup = text_lookup = None
    device = accelerator.device
    if cache_cfg.latents:
        models.vae.to(device)
        stats.append(build_latent_cache(
            manifest, models.vae, cache_dir / "latents", dtype=cache_cfg.dtype, store_std=cache_cfg.latent_std,
            batch_size=cache_cfg.batch_size, alpha_color=tuple(dataset.alpha_color),
            accelerator=accelerator, progress=progress,
        ))
        keys = latent_keys_for_manifest(manifest, models.vae, dtype=cache_cfg.dtype, store_std=cache_cfg.latent_std,
                                        alpha_color=tuple(dataset.alpha_color))
        latents = LatentCache(cache_dir / "latents", in_memory=cache_cfg.in_memory)
        latent_lookup = _RowLookup(latents, keys)
    if cache_cfg.text:
        for encoder in models.text_encoders:
            encoder.to(device)
        # Captions holding a trained word ([[embeddings]]) are encoded every step, never cached.
        captions = [c for c in sorted(set(manifest["caption"]) | {""}) if not mentions(c, embeddings)]
        stats.append(build_text_cache(
            captions, models.tokenizers, models.text_encoders, cache_dir / "text",
            dtype=cache_cfg.dtype, long_captions=dataset.long_captions, batch_size=cache_cfg.batch_size,
            accelerator=accelerator, progress=progress, weighted=dataset.weighted_captions,
        ))
        text_lookup = TextCache(cache_dir / "text", in_memory=cache_cfg.in_memory).get
    return latent_lookup, text_lookup, stats


class _RowLookup:
    """Picklable row-index -> cached latents (DataLoader workers need to pickle it)."""

    def __init__(self, cache, keys: list[str]):
        self.cache, self.keys = cache, keys

    def __call__(self, index: int) -> dict:
        return self.cache.get(self.keys[index])

    def subset(self, indices) -> _RowLookup:
        """The lookup for `manifest.select(indices)`."""
        return _RowLookup(self.cache, [self.keys[i] for i in indices])


def place_models(models, device, *, vae: bool, text_encoders: bool) -> None:
    """Keep on `device` only the models training still runs (`vae`, `text_encoders`: True for those
    whose work is not cached); the others move to the CPU, and their GPU memory is freed."""
    if vae:
        models.vae.to(device, dtype=torch.float32)
    else:
        models.vae.to("cpu")
    for encoder in models.text_encoders:
        encoder.to(device if text_encoders else "cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_caches(cfg, accelerator) -> list[str]:
    """`finetune cache`: build (or reuse) the manifest and both caches, as training would; the summary lines."""
    if accelerator.is_main_process:
        build_dataset(cfg.dataset, cfg.training.seed, cfg.output.manifest_dir)
    accelerator.wait_for_everyone()
    manifest = load_manifest(cfg.output.manifest_dir)
    models = load_models(cfg.model, dtype=torch.float32)
    _, _, stats = prepare_caches(manifest, models, accelerator, cfg.cache, cfg.cache_dir, cfg.dataset, cfg.embeddings)
    return [str(s) for s in stats]  # "latents: E encoded, R reused", "text: E encoded, R reused"
