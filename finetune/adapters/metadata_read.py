"""What a LoRA file's header says about the model it was trained for (base or refiner)."""

from __future__ import annotations

from pathlib import Path

from finetune.io import read_safetensors_header
from finetune.models.refiner import BASE_ARCHITECTURE, REFINER_ARCHITECTURE


def lora_kind(path: Path) -> str | None:
    """"base" or "refiner" from `modelspec.architecture`; None when the file does not say.

    Raises:
        ModelError: naming the file when it is no readable .safetensors.
    """
    architecture = read_safetensors_header(Path(path))[1].get("modelspec.architecture", "")
    if architecture.startswith(REFINER_ARCHITECTURE):
        return "refiner"
    if architecture.startswith(BASE_ARCHITECTURE):
        return "base"
    return None
