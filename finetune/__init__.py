"""SDXL fine-tuning: bucketed datasets, cached latents and embeddings, LoRA or full training, merge."""

__version__ = "0.1.0"
