"""The run's usable weight file: a LoRA with its metadata, or the fine-tuned UNet in SGM keys."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from captions.tags import tag_frequencies
from finetune.adapters.embedding_files import bundle_tensors
from finetune.adapters.metadata import adapter_metadata
from finetune.adapters.save import save_adapter
from finetune.config import dump_config
from finetune.dtypes import DTYPES
from finetune.io import atomic_file
from finetune.models.refiner import kind_of_unet
from finetune.models.sgm_keys import unet_state_dict_to_sgm
from finetune.train.words import save_word_files


def save_trained_weights(path: Path, unet, text_encoders, cfg, state, manifest, base_name: str,
                         unet_state: dict | None = None, words=None) -> Path:
    """Write the adapter (method = "lora"), the whole UNet (method = "full") or the embedding
    (method = "embedding") to `path`, atomically.

    `text_encoders` is the trained pair, or None when only the UNet trained; `unet_state`, when
    given, holds the full UNet's weights gathered from FSDP shards. `words` (NewWords): each word
    also goes to `embeddings/<word>.safetensors` beside `path`, and is bundled in a kohya LoRA.
    """
    dtype = DTYPES[cfg.output.save_dtype]
    if words is not None:
        save_word_files(path, words, cfg, dtype)
        if cfg.training.method == "embedding":
            return path
    if cfg.training.method == "lora":
        metadata = training_metadata(cfg, state, manifest, base_name, kind_of_unet(unet))
        bundled = bundle_tensors(words, dtype) if words is not None and cfg.lora.format == "kohya" else None
        return save_adapter(path, unet, text_encoders, fmt=cfg.lora.format, dtype=dtype, metadata=metadata,
                            extra_tensors=bundled)
    return save_full_unet(path, unet, unet_state, dtype)


@contextlib.contextmanager
def averaged_weights(ema, params):
    """With EMA (training.ema_decay), the trained parameters hold the average inside the block, then
    their own values again; without it, nothing changes."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def save_full_unet(path: Path, unet, state_dict: dict | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """The UNet alone, SGM keys (`model.diffusion_model.…`), as ComfyUI's UNet loader and merges read it."""
    sgm = unet_state_dict_to_sgm(unet.state_dict() if state_dict is None else state_dict, dict(unet.config))
    tensors = {f"model.diffusion_model.{k}": v.detach().to("cpu", dtype).contiguous() for k, v in sgm.items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"modelspec.architecture": f"stable-diffusion-xl-v1-{kind_of_unet(unet)}"})
    return path


def base_model_hash(path: Path) -> str | None:
    """A quick identity of the base model: sha256 of 64 KiB at 1 MiB into the file (A1111's legacy
    model hash), of the UNet weights for a diffusers folder. Reads 64 KiB, not gigabytes."""
    path = Path(path)
    if path.is_dir():
        files = sorted((path / "unet").glob("*.safetensors"))
        if not files:
            return None
        path = files[0]
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]


def training_metadata(cfg, state, manifest, base_name: str, kind: str = "base") -> dict[str, str]:
    buckets = sorted(Counter(tuple(b) for b in manifest["bucket"]))
    metadata = adapter_metadata(
        base_model=base_name,
        base_model_hash=base_model_hash(cfg.model.pretrained),
        method=cfg.training.method,
        variant=cfg.lora.variant,
        rank=cfg.lora.rank,
        alpha=cfg.lora.alpha,
        resolution=cfg.dataset.resolution,
        steps=state.step,
        epochs=state.epoch,
        dataset_size=len(manifest),
        buckets=buckets,
        tag_frequencies=tag_frequencies(manifest["caption"]),
        config_hash=hashlib.sha256(dump_config(cfg).encode()).hexdigest()[:16],
        title=cfg.output.name,
        kind=kind,
    )
    if state.changed_on_resume:  # resumed with --allow-changes: an uninterrupted run would differ
        metadata["finetune.reproducible"] = "false"
        metadata["finetune.changed_on_resume"] = json.dumps(state.changed_on_resume)
    return metadata
