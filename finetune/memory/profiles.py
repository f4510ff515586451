"""Memory profiles: named sets of memory/speed settings, and the pre-flight memory estimate.

A profile only fills the keys the user did not write: `memory_profile = "low_vram"` with
`optimizer.name = "adamw"` in the TOML keeps AdamW. The result passes the config's own cross-field
rules again, so a profile can never produce a config the user could not have written.
"""

from __future__ import annotations

import torch

from finetune.config import QUANTIZED_BASE_VARIANTS
from finetune.errors import ConfigError
from finetune.memory.quant import base_weight_nbytes, logical_numel

Settings = dict[tuple[str, str], object]  # (table, key) -> value

# LoRA, from least to most memory. Frozen base weights in bf16 (NF4 for min_vram) need bf16 autocast.
_BF16 = {("training", "mixed_precision"): "bf16", ("memory", "base_dtype"): "bf16"}
LORA_PROFILES: dict[str, Settings] = {
    "min_vram": {**_BF16, ("memory", "base_dtype"): "nf4", ("memory", "gradient_checkpointing"): True,
                 ("optimizer", "name"): "adamw8bit", ("training", "batch_size"): 1, ("memory", "compile"): False},
    "low_vram": {**_BF16, ("memory", "gradient_checkpointing"): True,
                 ("optimizer", "name"): "adamw8bit", ("memory", "compile"): False},
    # Recomputing only the transformer blocks keeps 87 % of full checkpointing's saving for 80 % of its
    # recompute (scripts/memory_trace.py, SDXL 1024²: 6.4 GiB, 18.7 TFLOP a step; `full` 5.6 GiB,
    # 19.7 TFLOP; none 12.3 GiB, 14.6 TFLOP). Without any, balanced would need what fast needs.
    "balanced": {**_BF16, ("memory", "gradient_checkpointing"): True,
                 ("memory", "checkpointing_mode"): "transformer",
                 ("optimizer", "name"): "adamw8bit", ("memory", "compile"): False},
    "fast": {**_BF16, ("memory", "gradient_checkpointing"): False,
             ("optimizer", "name"): "adamw", ("memory", "compile"): True},
}

# Full fine-tuning of the 2.6 B UNet: below `fast`, bf16 weights rounded stochastically, 8-bit
# AdamW state and the step fused into backward (no whole-model gradient): ~10 GB before activations.
_FUSED_BF16 = {("training", "mixed_precision"): "bf16", ("memory", "fused_backward"): True,
               ("memory", "weight_dtype"): "bf16", ("optimizer", "name"): "adamw8bit", ("memory", "compile"): False}
FULL_PROFILES: dict[str, Settings] = {
    "min_vram": {**_FUSED_BF16, ("memory", "gradient_checkpointing"): True, ("training", "batch_size"): 1},
    "low_vram": {**_FUSED_BF16, ("memory", "gradient_checkpointing"): True},
    "balanced": {**_FUSED_BF16, ("memory", "gradient_checkpointing"): False},
    "fast": {("training", "mixed_precision"): "bf16", ("memory", "gradient_checkpointing"): False,
             ("optimizer", "name"): "adamw", ("memory", "compile"): True},
}

# Free GPU memory (GiB) from which `auto` picks each profile: the peak that scripts/memory_trace.py
# traces for SDXL at 1024², batch 1 (LoRA 12.3 / 6.4 / 5.6 GiB, full 41.6 / 17.8 / 10.5 GiB), plus
# 15 % and 0.75 GiB for what only a GPU adds (allocator cache, cuBLAS/cuDNN workspaces). GPU
# measurements, when there are some, belong in docs/benchmarks.md and may move these.
AUTO_THRESHOLDS = {
    "lora": (("fast", 15.0), ("balanced", 8.5), ("low_vram", 7.0), ("min_vram", 0.0)),
    "full": (("fast", 48.0), ("balanced", 21.0), ("low_vram", 13.0), ("min_vram", 0.0)),
}


def profile_settings(name: str, method: str) -> Settings:
    """The settings profile `name` stands for, for training.method `method`."""
    return (FULL_PROFILES if method == "full" else LORA_PROFILES)[name]


def free_gpu_gib() -> float | None:
    """Free memory of the fullest visible GPU: every process of a multi-GPU run picks the same profile."""
    if not torch.cuda.is_available():
        return None
    return min(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())) / 2**30


def pick_auto(free_gib: float | None, method: str = "lora") -> tuple[str, str]:
    """The profile `auto` stands for, and why."""
    if free_gib is None:
        return "custom", "no CUDA GPU: memory is not the limit, so the config's own keys apply"
    for name, threshold in AUTO_THRESHOLDS.get(method, AUTO_THRESHOLDS["lora"]):  # embedding: a frozen UNet, as LoRA
        if free_gib >= threshold:
            return name, f"{free_gib:.1f} GiB free on the GPU (>= {threshold:g} GiB)"
    return "min_vram", f"{free_gib:.1f} GiB free on the GPU"


def apply_memory_profile(cfg, free_gib: float | None = None, num_processes: int = 1,
                         cuda: bool | None = None) -> tuple[object, str | None]:
    """A copy of `cfg` with its profile's settings filled in where the user set nothing.

    The copy's `memory.profile` names the profile `auto` chose, so the resolved config saved
    with each checkpoint records it and a resume can keep it. Without a profile, a LoRA's frozen base
    on a GPU is kept in the mixed-precision dtype unless `memory.base_dtype` is set (as kohya does):
    fp32 base weights would double the UNet's 5 GB.

    Returns:
        (config, message saying which profile applied and why; None when nothing changed).

    Raises:
        ConfigError: a key the user set contradicts one the profile sets (names both).
    """
    name = cfg.memory.profile
    if name == "custom":
        return _base_in_autocast_dtype(cfg, torch.cuda.is_available() if cuda is None else cuda)
    reason = "set in the config"
    if name == "auto":
        name, reason = pick_auto(free_gib if free_gib is not None else free_gpu_gib(), cfg.training.method)
    cfg = cfg.model_copy(deep=True)
    if name == "custom":  # what auto picks without a GPU: recorded, so a resume keeps it
        cfg.memory.profile = name
        return cfg, f"memory profile auto -> custom ({reason})"
    applied = {}
    for (table, key), value in profile_settings(name, cfg.training.method).items():
        section = getattr(cfg, table)
        if key not in section.model_fields_set:
            setattr(section, key, value)
            applied[f"{table}.{key}"] = str(value)
    _soften(cfg, applied, num_processes)
    cfg.memory.profile = name
    listed = ", ".join(f"{k}={v}" for k, v in applied.items()) or "every key already set"
    problems = cfg.cross_field_problems()
    if problems:
        raise ConfigError(f"memory.profile = '{name}' sets {listed}, which the rest of the config "
                          f"contradicts: {'; '.join(problems)}; set those keys yourself, or use memory.profile = 'custom'")
    return cfg, f"memory profile {name} ({reason}): {listed}"


def _base_in_autocast_dtype(cfg, cuda: bool) -> tuple[object, str | None]:
    training = cfg.training
    if (not cuda or training.method != "lora" or training.mixed_precision == "no"
            or "base_dtype" in cfg.memory.model_fields_set):
        return cfg, None
    cfg = cfg.model_copy(deep=True)
    cfg.memory.base_dtype = training.mixed_precision
    return cfg, (f"memory.base_dtype = {training.mixed_precision} (the mixed-precision dtype; set memory.base_dtype = "
                 "'fp32' to keep full-precision base weights)")


def _soften(cfg, applied: dict[str, str], num_processes: int) -> None:
    """Undo profile keys that cannot work with what the user chose, and say so in `applied`."""
    training, memory = cfg.training, cfg.memory

    def undo(key: str, value, why: str) -> None:
        if f"memory.{key}" in applied:
            setattr(memory, key, value)
            applied[f"memory.{key}"] = f"{value} ({why})"

    if training.mixed_precision == "no":
        # bf16 or quantized weights need autocast; the user turned it off, so they stay fp32.
        undo("base_dtype", "fp32", "no autocast")
        undo("weight_dtype", "fp32", "no autocast")
    quantized = QUANTIZED_BASE_VARIANTS.get(memory.base_dtype)
    if quantized and cfg.lora.variant not in quantized:
        undo("base_dtype", "bf16", f"lora.variant = {cfg.lora.variant} cannot train on a quantized base")
    # The config's own rules, plus what only a profile sees: EMA (bf16 weights would round it away)
    # and the launcher's process count.
    blockers = list(cfg.fused_backward_blockers())
    blockers += ["EMA"] * bool(training.ema_decay) + [f"{num_processes} processes"] * (num_processes > 1)
    if memory.fused_backward and blockers:
        undo("fused_backward", False, f"not with {', '.join(blockers)}")
        undo("weight_dtype", "fp32", "needs the fused backward")


# Bytes per frozen base weight. fp8/nf4 quantize the transformer blocks' Linear layers (86 % of
# SDXL's UNet weights) and keep the rest in bf16: 2.93 GB and 1.86 GB for the 2.567 B weights.
BASE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.14, "nf4": 0.72}
STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "paged_adamw8bit": 2, "lion8bit": 1, "adafactor": 4, "prodigy": 16}
# Activation GiB per megapixel per image under bf16 autocast, SDXL-sized UNet, as scripts/memory_trace.py
# traces the step (SDXL at 1024², batch 1 and 4): 7.2 without checkpointing, 0.6 with `full`, 1.45
# recomputing only the transformer blocks, 6.4 only the ResNets. Offload is not traced; it keeps
# about what `full` keeps on the GPU.
ACTIVATION_GIB_PER_MPX = {None: 7.2, "full": 0.6, "offload": 0.6, "transformer": 1.45, "resnet": 6.4}


def estimate_peak_gib(num_base_params: int, num_trained_params: int, *, base_dtype: str, optimizer: str,
                      pixels: int, batch_size: int, checkpointing: str | None,
                      trained_bytes: int = 4, fused_backward: bool = False,
                      base_weight_bytes: float | None = None) -> float:
    """A rough pre-flight estimate of peak GPU memory for the UNet step, in GiB.

    Frozen weights + trained weights + their gradients (none kept with the fused backward) +
    optimizer state + activations; the activation term is linear in pixels·batch and scales with
    the UNet's size.

    Args:
        checkpointing: None (off) or memory.checkpointing_mode.
        trained_bytes: 4 for fp32 trained weights, 2 for bf16 (memory.weight_dtype).
        base_weight_bytes: the frozen weights' bytes counted on a built model (else from BASE_BYTES).
    """
    grad_bytes = 0 if fused_backward else trained_bytes
    if base_weight_bytes is None:
        base_weight_bytes = num_base_params * BASE_BYTES[base_dtype]
    weights = (base_weight_bytes
               + num_trained_params * (trained_bytes + grad_bytes + STATE_BYTES.get(optimizer, 8)))
    unet_size = (num_base_params + num_trained_params) / 2.567e9
    activations = ACTIVATION_GIB_PER_MPX[checkpointing] * 2**30 * pixels / 2**20 * batch_size * unet_size
    return (weights + activations) / 2**30


def estimate_run_gib(unet, trained_params, training, memory, optimizer: str, pixels: int) -> float:
    """`estimate_peak_gib` for a UNet that `prepare_unet` set up, with the run's settings.

    What `finetune train` prints before its first step, and what scripts/memory_trace.py compares
    with the traced peak.
    """
    trained = sum(p.numel() for p in trained_params)
    total = sum(logical_numel(p) for p in unet.parameters())
    lora = training.method != "full"  # LoRA, or embeddings only: a frozen base
    return estimate_peak_gib(
        total - trained if lora else 0, trained, base_dtype=memory.base_dtype, optimizer=optimizer,
        pixels=pixels, batch_size=training.batch_size,
        checkpointing=memory.checkpointing_mode if memory.gradient_checkpointing else None,
        trained_bytes=2 if not lora and memory.weight_dtype == "bf16" else 4,
        fused_backward=memory.fused_backward, base_weight_bytes=base_weight_nbytes(unet) if lora else None)


def out_of_memory_message(phase: str) -> str:
    """What to change after CUDA ran out of memory while `phase` ("caching" or training) ran."""
    if phase == "caching":
        return ("out of GPU memory while building the caches: lower cache.batch_size (1 fits any card), "
                "then run the same command again; finished cache shards are kept")
    return ("out of GPU memory: lower training.batch_size, set memory.gradient_checkpointing = true, "
            "memory.base_dtype = 'bf16' (or 'fp8'), optimizer.name = 'adamw8bit', or memory.profile = 'low_vram'; "
            "then rerun with --resume")
