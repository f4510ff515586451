"""Latent and text-embedding caches: built once before training, keyed by what produced them."""

from finetune.cache.keys import module_identity, text_identity, vae_encode_dtype, vae_identity
from finetune.cache.latents import (
    LatentCache,
    build_latent_cache,
    encode_latents,
    latent_key_for_row,
    latent_keys_for_manifest,
    sample_latents,
)
from finetune.cache.store import CacheError, CacheStats
from finetune.cache.text import TextCache, build_text_cache

__all__ = [
    "CacheError",
    "CacheStats",
    "LatentCache",
    "TextCache",
    "build_latent_cache",
    "build_text_cache",
    "encode_latents",
    "latent_key_for_row",
    "latent_keys_for_manifest",
    "module_identity",
    "sample_latents",
    "text_identity",
    "vae_encode_dtype",
    "vae_identity",
]
