"""The tiny model has SDXL's structure: names, conditioning inputs, and a pipeline that opens it."""

from __future__ import annotations

import pytest

import re

import torch

from finetune.models.configs import sdxl_unet_config
from finetune.models.sgm_keys import weighted_module_paths
from finetune.models.tiny import build_tiny_pipeline, tiny_unet_config

ATTN = re.compile(r"\.(attn[12])\.(to_q|to_k|to_v|to_out\.0)$")


def depthless(name: str) -> str:
    """Module path with the transformer-block index dropped: depths differ, structure must not."""
    return re.sub(r"transformer_blocks\.\d+", "transformer_blocks.N", name)


def test_every_sdxl_attention_projection_exists_in_the_tiny_unet():
    real = {depthless(n) for n in weighted_module_paths(sdxl_unet_config()) if ATTN.search(n)}
    tiny = {depthless(n) for n in weighted_module_paths(tiny_unet_config()) if ATTN.search(n)}
    assert len(real) == 88  # 11 Transformer2D positions x (attn1, attn2) x (q, k, v, out), depth aside
    assert real == tiny


def test_every_sdxl_module_kind_exists_in_the_tiny_unet():
    real = {depthless(n) for n in weighted_module_paths(sdxl_unet_config())}
    tiny = {depthless(n) for n in weighted_module_paths(tiny_unet_config())}
    assert real == tiny


def test_forward_uses_micro_conditioning():
    pipe = build_tiny_pipeline(seed=0)
    unet = pipe.unet.eval()
    latents = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    prompt_embeds = torch.randn(1, 77, unet.config.cross_attention_dim)
    pooled = torch.randn(1, pipe.text_encoder_2.config.projection_dim)

    def run(time_ids):
        cond = {"text_embeds": pooled, "time_ids": torch.tensor([time_ids], dtype=torch.float32)}
        with torch.no_grad():
            return unet(latents, torch.tensor([500]), encoder_hidden_states=prompt_embeds, added_cond_kwargs=cond).sample

    out = run([128, 192, 0, 0, 128, 192])
    assert out.shape == latents.shape
    assert not torch.allclose(out, run([64, 96, 0, 0, 128, 192]))  # original size matters
    assert not torch.allclose(out, run([128, 192, 16, 8, 128, 192]))  # crop offsets matter


def test_tiny_model_has_sdxl_conditioning_widths():
    pipe = build_tiny_pipeline(seed=0)
    te1, te2 = pipe.text_encoder.config, pipe.text_encoder_2.config
    assert te1.hidden_size != te2.hidden_size  # diffusers tells the encoders apart by width
    assert min(te1.num_hidden_layers, te2.num_hidden_layers) >= 3  # ComfyUI reads layer -2
    assert pipe.unet.config.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.latent_channels == 4
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.slow
def test_saved_tiny_model_opens_with_the_sdxl_pipeline(tiny_model_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    image = pipe("a red square", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
