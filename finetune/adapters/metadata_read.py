"""What a LoRA file's header says about the model it was trained for (base or refiner)."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from finetune.errors import ModelError
from finetune.models.refiner import BASE_ARCHITECTURE, REFINER_ARCHITECTURE


def lora_kind(path: Path) -> str | None:
    """"base" or "refiner" from `modelspec.architecture`; None when the file does not say."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            architecture = (fh.metadata() or {}).get("modelspec.architecture", "")
    except Exception as err:  # safetensors raises its own error type for a damaged header
        raise ModelError(f"{path}: not a readable .safetensors file ({err})") from None
    if architecture.startswith(REFINER_ARCHITECTURE):
        return "refiner"
    if architecture.startswith(BASE_ARCHITECTURE):
        return "base"
    return None
