"""The SDXL refiner: telling it from the base by its weights, and its shipped configs (the tiny refiner is
in finetune/models/tiny_refiner.py).

The refiner (SDXL paper §2.5) has one text encoder, OpenCLIP ViT-bigG (context 1280 = its penultimate
hidden states, plus its pooled embedding), five micro-conditioning values
`[orig_h, orig_w, crop_top, crop_left, aesthetic_score]`, and a four-level UNet (384/768/1536/1536,
transformer depth 4 at the two middle levels). Its single files keep the bigG encoder under
`conditioner.embedders.0.model.*`, where the base has CLIP-L at embedders.0 and bigG at embedders.1.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import resources
from pathlib import Path

from finetune.errors import ModelError
from finetune.io import atomic_dir
from finetune.models.tokenizers import save_clip_tokenizer

KINDS = ("base", "refiner")
REFINER_TIME_IDS = 5  # orig_h, orig_w, crop_top, crop_left, aesthetic_score
# The refiner's part of the noise schedule (SDXL paper §2.5: the first 200 of 1000 noise levels).
REFINER_TIMESTEPS = (0, 200)
REFINER_ARCHITECTURE = "stable-diffusion-xl-v1-refiner"
BASE_ARCHITECTURE = "stable-diffusion-xl-v1-base"
SF_BASE_MARKER = "conditioner.embedders.1.model."
SF_REFINER_MARKER = "conditioner.embedders.0.model."


# --- which kind of SDXL model -------------------------------------------------------------------

def kind_of_unet_config(unet_config: dict, pooled_dim: int) -> str:
    """"refiner" when the UNet's addition embedding takes five micro-conditioning values, else "base"."""
    count = (int(unet_config["projection_class_embeddings_input_dim"]) - pooled_dim) // int(
        unet_config["addition_time_embed_dim"])
    return "refiner" if count == REFINER_TIME_IDS else "base"


def kind_of_folder(path: Path) -> str:
    """Kind of a diffusers folder, from its UNet and text_encoder_2 configs (what its weights are built to)."""
    try:
        unet = json.loads((Path(path) / "unet" / "config.json").read_text(encoding="utf-8"))
        te2 = json.loads((Path(path) / "text_encoder_2" / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: not an SDXL diffusers folder ({err}); point model.pretrained at a saved "
                         "pipeline folder or a single-file .safetensors") from None
    return kind_of_unet_config(unet, int(te2.get("projection_dim", te2["hidden_size"])))


def kind_of_keys(keys) -> str | None:
    """Kind of a single-file SGM checkpoint from its text-encoder keys; None when it holds neither layout."""
    keys = list(keys)
    if any(k.startswith(SF_BASE_MARKER) for k in keys):
        return "base"
    if any(k.startswith(SF_REFINER_MARKER) for k in keys):
        return "refiner"
    return None


def kind_of_unet(unet) -> str:
    """Kind of a loaded UNet (diffusers), from its addition-embedding width and time-embedding size."""
    config = unet.config
    pooled = int(config.projection_class_embeddings_input_dim) - REFINER_TIME_IDS * int(config.addition_time_embed_dim)
    # The refiner's pooled embedding (bigG alone) is as wide as its context; the base's context is wider (L + G).
    return "refiner" if pooled == int(config.cross_attention_dim) else "base"


def check_kind(found: str, wanted: str, where: str) -> str:
    """`found` when `wanted` is "auto" or agrees; otherwise one line naming the file and the fix."""
    if wanted not in ("auto", *KINDS):
        raise ModelError(f"model.kind = {wanted!r}: choose 'auto', 'base' or 'refiner'")
    if wanted != "auto" and wanted != found:
        raise ModelError(f"{where}: this is an SDXL {found}, but model.kind = {wanted!r}; point model.pretrained "
                         f"at an SDXL {wanted} or set model.kind = 'auto'")
    return found


# --- shipped configs ---------------------------------------------------------------------------

def sdxl_refiner_dir() -> Path:
    """The bundled config-only diffusers layout of SDXL refiner 1.0 (no weights, no tokenizer files)."""
    return Path(str(resources.files("finetune.models") / "data" / "sdxl_refiner"))


def sdxl_refiner_unet_config() -> dict:
    return json.loads((sdxl_refiner_dir() / "unet" / "config.json").read_text(encoding="utf-8"))


def refiner_config_dir() -> Path:
    """The refiner's configs + bigG tokenizer, materialized once into the user cache (for from_single_file)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    target = cache / "sdxl-finetune" / "sdxl_refiner"
    if not ((target / "model_index.json").is_file() and (target / "tokenizer_2").is_dir()):
        with atomic_dir(target) as tmp:
            shutil.copytree(sdxl_refiner_dir(), tmp, dirs_exist_ok=True)
            save_clip_tokenizer(tmp / "tokenizer_2", pad_token="!")
    return target
