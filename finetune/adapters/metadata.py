"""Adapter file metadata: kohya's `ss_*` keys and the `modelspec.*` keys model sites and UIs read."""

from __future__ import annotations

import json
import time


def adapter_metadata(*, base_model: str, base_model_hash: str | None, method: str, variant: str, rank: int,
                     alpha: float, resolution: int, steps: int, epochs: int, dataset_size: int,
                     buckets: list[tuple[int, int]], tag_frequencies: dict[str, int], config_hash: str,
                     title: str, kind: str = "base") -> dict[str, str]:
    """All values are strings, as the safetensors header requires. `kind`: "base" or "refiner"."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"stable-diffusion-xl-v1-{kind}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.date": now,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "ss_base_model_version": f"sdxl_{kind}_v1-0",
        "ss_sd_model_name": base_model,
        "ss_sd_model_hash": base_model_hash or "",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps({"variant": variant}),
        "ss_training_method": method,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_steps": str(steps),
        "ss_epoch": str(epochs),
        "ss_num_train_images": str(dataset_size),
        "ss_bucket_info": json.dumps({"buckets": [list(b) for b in buckets]}),
        "ss_tag_frequency": json.dumps({"dataset": tag_frequencies}, ensure_ascii=False),
        "ss_training_config_hash": config_hash,
        "ss_training_finished_at": now,
    }
