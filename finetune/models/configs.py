"""SDXL base 1.0's component configs, shipped as package data so nothing reaches for the hub."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from finetune.models.tokenizers import save_clip_tokenizer


def sdxl_base_dir() -> Path:
    """The bundled config-only diffusers layout of SDXL base 1.0 (no weights, no tokenizer files)."""
    return Path(str(resources.files("finetune.models") / "data" / "sdxl_base"))


def _read(rel: str) -> dict:
    return json.loads((sdxl_base_dir() / rel).read_text(encoding="utf-8"))


def sdxl_unet_config() -> dict:
    return _read("unet/config.json")


def sdxl_vae_config() -> dict:
    return _read("vae/config.json")


def sdxl_text_configs() -> tuple[dict, dict]:
    return _read("text_encoder/config.json"), _read("text_encoder_2/config.json")


def sdxl_scheduler_config() -> dict:
    return _read("scheduler/scheduler_config.json")


def materialize_config_folder(out: Path) -> Path:
    """A complete config folder (configs + tokenizers) for diffusers' `from_single_file(config=...)`."""
    out = Path(out)
    if not (out / "tokenizer_2" / "vocab.json").exists():
        shutil.copytree(sdxl_base_dir(), out, dirs_exist_ok=True)
        save_clip_tokenizer(out / "tokenizer", pad_token="<|endoftext|>")
        save_clip_tokenizer(out / "tokenizer_2", pad_token="!")
    return out
