"""Memory profiles: named sets of memory/speed settings, and the pre-flight memory estimate.

A profile only fills the keys the user did not write: `memory_profile = "low_vram"` with
`optimizer.name = "adamw"` in the TOML keeps AdamW.
"""

from __future__ import annotations

import torch

# (table, key) -> value. Ordered from least to most memory.
# Every profile keeps frozen base weights in bf16, which needs bf16 autocast.
_BF16 = {("training", "mixed_precision"): "bf16", ("training", "base_dtype"): "bf16"}
PROFILES: dict[str, dict[tuple[str, str], object]] = {
    "min_vram": {**_BF16, ("training", "gradient_checkpointing"): True,
                 ("optimizer", "name"): "adamw8bit", ("training", "batch_size"): 1, ("training", "compile"): False},
    "low_vram": {**_BF16, ("training", "gradient_checkpointing"): True,
                 ("optimizer", "name"): "adamw8bit", ("training", "compile"): False},
    "balanced": {**_BF16, ("training", "gradient_checkpointing"): False,
                 ("optimizer", "name"): "adamw8bit", ("training", "compile"): False},
    "fast": {**_BF16, ("training", "gradient_checkpointing"): False,
             ("optimizer", "name"): "adamw", ("training", "compile"): True},
}

# Free GPU memory (GiB) from which `auto` picks each profile; measured rows live in docs/benchmarks.md.
AUTO_THRESHOLDS = (("fast", 20.0), ("balanced", 14.0), ("low_vram", 9.0), ("min_vram", 0.0))


def free_gpu_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


def pick_auto(free_gib: float | None) -> tuple[str, str]:
    """The profile `auto` stands for, and why."""
    if free_gib is None:
        return "balanced", "no CUDA GPU: memory is not the limit, checkpointing would only slow the CPU"
    for name, threshold in AUTO_THRESHOLDS:
        if free_gib >= threshold:
            return name, f"{free_gib:.1f} GiB free on the GPU (>= {threshold:g} GiB)"
    return "min_vram", f"{free_gib:.1f} GiB free on the GPU"


def apply_memory_profile(cfg, free_gib: float | None = None) -> tuple[object, str | None]:
    """A copy of `cfg` with its profile's settings filled in where the user set nothing.

    Returns:
        (config, message saying which profile applied and why; None for "custom").
    """
    name = cfg.training.memory_profile
    if name == "custom":
        return cfg, None
    reason = "set in the config"
    if name == "auto":
        name, reason = pick_auto(free_gib if free_gib is not None else free_gpu_gib())
    cfg = cfg.model_copy(deep=True)
    applied = []
    for (table, key), value in PROFILES[name].items():
        section = getattr(cfg, table)
        if key not in section.model_fields_set:
            setattr(section, key, value)
            applied.append(f"{table}.{key}={value}")
    training = cfg.training
    profile_set_base = any(a.startswith("training.base_dtype") for a in applied)
    if training.mixed_precision == "no" and training.base_dtype != "fp32" and profile_set_base:
        # bf16 base weights need autocast; the user turned it off, so the base stays fp32.
        training.base_dtype = "fp32"
        applied = [a for a in applied if not a.startswith("training.base_dtype")] + ["training.base_dtype=fp32 (no autocast)"]
    return cfg, f"memory profile {name} ({reason}): {', '.join(applied) or 'every key already set'}"


def estimate_peak_gib(num_base_params: int, num_trained_params: int, *, base_bytes: int, optimizer: str,
                      pixels: int, batch_size: int, checkpointing: bool) -> float:
    """A rough pre-flight estimate of peak GPU memory for the UNet step, in GiB.

    Weights + trained fp32 copies + gradients + optimizer state + activations. The activation term
    is linear in pixels·batch; its constants are SDXL's measured order of magnitude (about 10 GiB at
    1024², batch 1, bf16 without checkpointing; about 1.5 GiB with it) and scale with the UNet size.
    """
    state_bytes = {"adamw": 8, "adamw8bit": 2, "paged_adamw8bit": 2, "lion8bit": 1, "adafactor": 4, "prodigy": 16}
    weights = num_base_params * base_bytes + num_trained_params * (4 + 4 + state_bytes.get(optimizer, 8))
    per_pixel = (1.5 if checkpointing else 10.0) * 2**30 / (1024 * 1024)
    activations = per_pixel * pixels * batch_size * (num_base_params / 2.567e9)
    return (weights + activations) / 2**30
