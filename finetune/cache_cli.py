"""`finetune cache CONFIG`: build both caches for the configured dataset, as training would."""

from __future__ import annotations


def build_caches(cfg) -> list[str]:
    """Build (or reuse) the manifest and both caches; return the summary lines."""
    import torch

    from bucketing.manifest import load_manifest
    from finetune.dataset import build_dataset
    from finetune.models.load import load_models
    from finetune.setup import make_accelerator, prepare_caches

    accelerator = make_accelerator(cfg.training, cfg.logging, cfg.output.dir)
    if accelerator.is_main_process:
        build_dataset(cfg.dataset, cfg.training.seed, cfg.output.manifest_dir)
    accelerator.wait_for_everyone()
    manifest = load_manifest(cfg.output.manifest_dir)
    models = load_models(cfg.model, dtype=torch.float32)
    _, _, stats = prepare_caches(cfg, manifest, models, accelerator)
    return [str(s) for s in stats]  # "latents: E encoded, R reused", "text: E encoded, R reused"
