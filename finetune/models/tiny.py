"""The tiny SDXL-architecture model: SDXL's module tree at toy widths, built offline in a second.

Every module name of the real SDXL UNet exists here (transformer depth aside), so LoRA key names,
merges and loaders are exercised exactly as on the real model. Used by the tests, the quickstart
and `scripts/benchmark.py --tiny`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.io import atomic_dir
from finetune.models.configs import sdxl_scheduler_config
from finetune.models.tokenizers import load_clip_tokenizer, save_clip_tokenizer

# diffusers and transformers are imported where the model is built: importing them takes seconds.

# Widths are free; the structure is SDXL's. The encoders need different hidden sizes (diffusers
# tells them apart by width) and at least 3 layers (ComfyUI reads the penultimate layer by index).
TE1_HIDDEN, TE2_HIDDEN, TE2_PROJECTION = 32, 64, 64
TIME_EMBED_DIM = 8  # SDXL: 256


def tiny_unet_config() -> dict:
    return {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": [32, 64, 128],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 1, 2],
        "attention_head_dim": [2, 4, 8],
        "cross_attention_dim": TE1_HIDDEN + TE2_HIDDEN,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": TIME_EMBED_DIM,
        # 6 micro-conditioning numbers, each Fourier-embedded, plus the pooled text embedding.
        "projection_class_embeddings_input_dim": 6 * TIME_EMBED_DIM + TE2_PROJECTION,
        "norm_num_groups": 32,
    }


def tiny_vae_config() -> dict:
    return {
        "in_channels": 3,
        "out_channels": 3,
        # Four levels: three downsamples, SDXL's 8x.
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [16, 32, 32, 32],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 256,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    }


def tiny_text_configs() -> tuple[dict, dict]:
    common = {
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "num_hidden_layers": 3,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }
    te1 = {**common, "hidden_size": TE1_HIDDEN, "intermediate_size": 64, "num_attention_heads": 4,
           "hidden_act": "quick_gelu", "projection_dim": TE1_HIDDEN}
    te2 = {**common, "hidden_size": TE2_HIDDEN, "intermediate_size": 128, "num_attention_heads": 4,
           "hidden_act": "gelu", "projection_dim": TE2_PROJECTION}
    return te1, te2


def build_tiny_pipeline(seed: int = 0):
    """A `StableDiffusionXLPipeline` with random tiny weights (deterministic for a seed)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config())
    vae = AutoencoderKL(**tiny_vae_config())
    te1_cfg, te2_cfg = tiny_text_configs()
    text_encoder = CLIPTextModel(CLIPTextConfig(**te1_cfg))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**te2_cfg))
    scheduler = EulerDiscreteScheduler.from_config(sdxl_scheduler_config())
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=load_clip_tokenizer(pad_token="<|endoftext|>"),
        tokenizer_2=load_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=scheduler,
    )


def materialize_tiny_config_folder(out: Path) -> Path:
    """The tiny model's configs and tokenizers without weights: what `from_single_file(config=...)` needs."""
    out = Path(out)
    pipe = build_tiny_pipeline(0)
    pipe.save_config(out)  # model_index.json
    for name in ("unet", "vae", "scheduler"):
        getattr(pipe, name).save_config(out / name)
    for name in ("text_encoder", "text_encoder_2"):
        getattr(pipe, name).config.save_pretrained(out / name)
    save_clip_tokenizer(out / "tokenizer", pad_token="<|endoftext|>")
    save_clip_tokenizer(out / "tokenizer_2", pad_token="!")
    return out


def save_tiny_model(out: Path, seed: int = 0) -> Path:
    """Write the tiny model as a diffusers folder that `StableDiffusionXLPipeline.from_pretrained` opens
    (`single_file.save_tiny_single_file` writes it as one SGM file)."""
    out = Path(out)
    pipe = build_tiny_pipeline(seed)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        # save_pretrained writes the tokenizers too; rewrite them so both carry SDXL's padding.
        save_clip_tokenizer(tmp / "tokenizer", pad_token="<|endoftext|>")
        save_clip_tokenizer(tmp / "tokenizer_2", pad_token="!")
    return out
