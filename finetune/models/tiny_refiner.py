"""The tiny SDXL refiner: the refiner's block types and conditioning at toy widths, built offline, for tests.

It shares the tiny base's VAE and bigG encoder, as the real refiner shares the base's, so latent caches
are shared and the two-stage hand-off is meaningful.
"""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.io import atomic_dir
from finetune.models.refiner import REFINER_TIME_IDS
from finetune.models.tiny import TE2_HIDDEN, TE2_PROJECTION, TIME_EMBED_DIM, build_tiny_pipeline
from finetune.models.tokenizers import save_clip_tokenizer

# diffusers is imported where the refiner is built: importing it takes seconds.


def tiny_refiner_unet_config() -> dict:
    """The refiner's block types and conditioning at toy widths (context and pooled = the tiny bigG's)."""
    return {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": [32, 64, 64, 64],
        "layers_per_block": 2,
        "transformer_layers_per_block": 1,  # the refiner: 4 everywhere it has attention
        "attention_head_dim": [2, 4, 4, 4],
        "cross_attention_dim": TE2_HIDDEN,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": TIME_EMBED_DIM,
        # 5 micro-conditioning numbers (with the aesthetic score), each Fourier-embedded, plus bigG's pooled.
        "projection_class_embeddings_input_dim": REFINER_TIME_IDS * TIME_EMBED_DIM + TE2_PROJECTION,
        "norm_num_groups": 32,
    }


def build_tiny_refiner(seed: int = 0):
    """A `StableDiffusionXLImg2ImgPipeline` shaped like the refiner; VAE and bigG are the tiny base's own.

    The real refiner shares the base's VAE (so latent caches are shared) and its OpenCLIP bigG; the
    tiny pair does the same, which makes the two-stage hand-off meaningful.
    """
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    base = build_tiny_pipeline(seed)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**tiny_refiner_unet_config())
    return StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, unet=unet, scheduler=base.scheduler,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )


def save_tiny_refiner(out: Path, seed: int = 0) -> Path:
    """Write the tiny refiner as a diffusers folder that `StableDiffusionXLImg2ImgPipeline.from_pretrained` opens."""
    out = Path(out)
    pipe = build_tiny_refiner(seed)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        save_clip_tokenizer(tmp / "tokenizer_2", pad_token="!")  # bigG pads with "!" (id 0)
    return out
