"""finetune/cache/latents.py: cached latents equal a fresh encode; rebuilds touch exactly what changed."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

import finetune.cache.latents as latents_mod
from finetune.cache import (
    CacheError,
    LatentCache,
    build_latent_cache,
    latent_key_for_row,
    latent_keys_for_manifest,
    sample_latents,
    vae_identity,
)


def _fresh(vae, reference_pixels, row):
    """Independent reference: the diffusers VAE on the image, scaled by the config's factor."""
    pixels = reference_pixels(Path(row["root"]) / row["path"], row["flip"])[None]
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    return dist.mean[0] * vae.config.scaling_factor, dist.std[0] * vae.config.scaling_factor


@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-5), ("fp16", 2e-3), ("bf16", 1e-2)])
def test_cached_latents_equal_fresh_encode(tmp_path, images, make_vae, make_manifest, reference_pixels, dtype, tol):
    vae, manifest = make_vae(), make_manifest(images, flip=True)
    stats = build_latent_cache(manifest, vae, tmp_path / "cache", dtype=dtype, batch_size=3, progress=False)
    assert (stats.encoded, stats.reused) == (8, 0)
    keys = latent_keys_for_manifest(manifest, vae, dtype=dtype)
    cache = LatentCache(tmp_path / "cache")
    for i, row in enumerate(manifest):
        entry = cache.get(keys[i])
        mean, std = _fresh(vae, reference_pixels, row)
        h, w = row["bucket"]
        assert entry["mean"].shape == (4, h // 8, w // 8)
        assert entry["mean"].dtype == {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        torch.testing.assert_close(entry["mean"].float(), mean, atol=tol * mean.abs().max().item(), rtol=0)
        torch.testing.assert_close(entry["std"].float(), std, atol=tol * std.abs().max().item(), rtol=0)
    # The flipped variant is its own entry, and differs.
    assert not torch.equal(cache.get(keys[0])["mean"], cache.get(keys[1])["mean"])


def test_mean_only(tmp_path, images, make_vae, make_manifest):
    vae, manifest = make_vae(), make_manifest(images)
    build_latent_cache(manifest, vae, tmp_path, dtype="fp32", store_std=False, progress=False)
    key = latent_keys_for_manifest(manifest, vae, dtype="fp32", store_std=False)[0]
    assert set(LatentCache(tmp_path).get(key)) == {"mean"}
    # A mean-only cache does not answer for a mean+std request.
    assert latent_keys_for_manifest(manifest, vae, dtype="fp32", store_std=True)[0] not in LatentCache(tmp_path)


def test_key_for_row_matches_manifest_keys(images, make_vae, make_manifest):
    vae, manifest = make_vae(), make_manifest(images)
    keys = latent_keys_for_manifest(manifest, vae, dtype="fp16", store_std=True)
    assert keys[2] == latent_key_for_row(manifest[2], vae_identity(vae), "fp16", True)
    assert len(set(keys)) == len(keys)


def test_rebuild_reuses_everything(tmp_path, images, make_vae, make_manifest):
    vae, manifest = make_vae(), make_manifest(images)
    build_latent_cache(manifest, vae, tmp_path, progress=False)
    stats = build_latent_cache(manifest, vae, tmp_path, progress=False)
    assert (stats.encoded, stats.reused) == (0, 4)
    assert str(stats) == "latents: 0 encoded, 4 reused"


def test_editing_one_image_reencodes_exactly_that_entry(tmp_path, images, make_vae, make_manifest):
    vae = make_vae()
    build_latent_cache(make_manifest(images), vae, tmp_path, progress=False)
    image = Image.open(images / "img2.png").convert("RGB")
    image.putpixel((5, 5), (0, 0, 0))
    image.save(images / "img2.png")
    manifest = make_manifest(images)  # a new scan: img2's fingerprint changed
    stats = build_latent_cache(manifest, vae, tmp_path, progress=False)
    assert (stats.encoded, stats.reused) == (1, 3)
    key = latent_keys_for_manifest(manifest, vae)[2]
    assert key in LatentCache(tmp_path)


def test_changing_the_vae_reencodes_all(tmp_path, images, make_vae, make_manifest):
    manifest = make_manifest(images)
    build_latent_cache(manifest, make_vae(0), tmp_path, progress=False)
    stats = build_latent_cache(manifest, make_vae(1), tmp_path, progress=False)
    assert (stats.encoded, stats.reused) == (4, 0)
    # Storage settings are part of the key too.
    assert build_latent_cache(manifest, make_vae(1), tmp_path, dtype="fp32", progress=False).encoded == 4
    assert build_latent_cache(manifest, make_vae(1), tmp_path, alpha_color=(0, 0, 0), progress=False).encoded == 4


def test_truncated_shard_is_detected_and_rebuilt(tmp_path, images, make_vae, make_manifest):
    vae, manifest = make_vae(), make_manifest(images)
    build_latent_cache(manifest, vae, tmp_path, shard_size=2, progress=False)
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) == 2
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match="missing or damaged"):
        LatentCache(tmp_path)
    stats = build_latent_cache(manifest, vae, tmp_path, shard_size=2, progress=False)
    assert (stats.encoded, stats.reused) == (2, 2)
    assert not shards[0].exists()  # the damaged shard is gone, not left to be read
    cache = LatentCache(tmp_path)
    assert all(k in cache for k in latent_keys_for_manifest(manifest, vae))


def test_corrupted_shard_same_size_is_detected(tmp_path, images, make_vae, make_manifest):
    vae, manifest = make_vae(), make_manifest(images)
    build_latent_cache(manifest, vae, tmp_path, shard_size=4, progress=False)
    shard = next(tmp_path.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert build_latent_cache(manifest, vae, tmp_path, shard_size=4, progress=False).encoded == 4


def test_interrupted_build_resumes_with_finished_shard(tmp_path, images, make_vae, make_manifest, monkeypatch):
    vae, manifest = make_vae(), make_manifest(images)
    real_load, calls = latents_mod.load_row_pixels, []

    def failing_load(row, alpha_color):
        calls.append(row["path"])
        if len(calls) > 2:
            raise KeyboardInterrupt("simulated interruption")
        return real_load(row, alpha_color)

    monkeypatch.setattr(latents_mod, "load_row_pixels", failing_load)
    with pytest.raises(KeyboardInterrupt):
        build_latent_cache(manifest, vae, tmp_path, batch_size=1, shard_size=2, progress=False)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    assert not (tmp_path / "index.json").exists()
    monkeypatch.setattr(latents_mod, "load_row_pixels", real_load)
    stats = build_latent_cache(manifest, vae, tmp_path, batch_size=1, shard_size=2, progress=False)
    assert (stats.encoded, stats.reused) == (2, 2)
    assert len(LatentCache(tmp_path)) == 4


def test_fp16_vae_is_upcast_for_encoding(tmp_path, images, make_vae, make_manifest, reference_pixels):
    vae, manifest = make_vae(), make_manifest(images)
    reference = _fresh(vae, reference_pixels, manifest[0])[0]
    vae_half = make_vae().half()
    seen = []
    vae_half.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    build_latent_cache(manifest, vae_half, tmp_path, dtype="fp32", progress=False)
    assert seen and set(seen) == {torch.float32}
    assert next(vae_half.parameters()).dtype == torch.float16  # restored afterwards
    key = latent_keys_for_manifest(manifest, vae_half, dtype="fp32")[0]
    torch.testing.assert_close(LatentCache(tmp_path).get(key)["mean"], reference, atol=2e-3, rtol=0)


def test_in_memory_and_pickled_reader(tmp_path, images, make_vae, make_manifest):
    vae, manifest = make_vae(), make_manifest(images)
    build_latent_cache(manifest, vae, tmp_path, shard_size=3, progress=False)
    key = latent_keys_for_manifest(manifest, vae)[3]
    lazy = LatentCache(tmp_path)
    expected = lazy.get(key)
    for cache in (LatentCache(tmp_path, in_memory=True), pickle.loads(pickle.dumps(lazy))):
        got = cache.get(key)
        assert torch.equal(got["mean"], expected["mean"]) and torch.equal(got["std"], expected["std"])


def test_unknown_key_names_the_fix(tmp_path, images, make_vae, make_manifest):
    build_latent_cache(make_manifest(images), make_vae(), tmp_path, progress=False)
    with pytest.raises(CacheError, match="finetune cache"):
        LatentCache(tmp_path).get("0" * 64)


def test_sample_latents():
    mean, std = torch.randn(4, 8, 8).half(), torch.rand(4, 8, 8).half()
    assert torch.equal(sample_latents(mean, None), mean.float())
    a = sample_latents(mean, std, torch.Generator().manual_seed(3))
    b = sample_latents(mean, std, torch.Generator().manual_seed(3))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    assert a.dtype == torch.float32 and torch.equal(a, b)
    torch.testing.assert_close(a, mean.float() + std.float() * noise)
