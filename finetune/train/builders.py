"""The trainer's builders: each takes its slice of the config and returns one object."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration

from finetune.adapters.inject import add_text_encoder_adapters, add_unet_adapter, block_pattern
from finetune.adapters.load import load_adapter_weights
from finetune.adapters.save import lora_layers
from finetune.config import (DatasetConfig, LoraConfig, LossConfig, MemoryConfig, OptimizerConfig, TrainingConfig,
                             ValidationConfig)
from finetune.dtypes import DTYPES
from finetune.errors import ConfigError
from finetune.memory.activations import enable_checkpointing, saved_activations
from finetune.memory.fused import FusedBackwardOptimizer
from finetune.memory.profiles import apply_memory_profile
from finetune.memory.quant import quantize_base_linears
from finetune.train import checkpoint as ckpt
from finetune.train.batches import TrainDataset, build_dataloader
from finetune.train.distributed import PROCESS_GROUP_TIMEOUT, fsdp_on_cpu
from finetune.train.optim import build_lr_scheduler, build_optimizer
from finetune.train.resume import with_checkpoint_profile
from finetune.plan import split_rows

log = logging.getLogger("finetune")


def memory_config(cfg, point=None):
    """The config with its memory profile applied, and the line that says what the profile chose.

    A resume (`point`, the checkpoint it continues) of an "auto" run keeps the profile its checkpoint was
    trained with: free memory moves, the run's precision and memory settings must not. The process count
    is the launcher's (WORLD_SIZE), read before the accelerator exists.
    """
    if point is not None:
        cfg = with_checkpoint_profile(cfg, point)
    return apply_memory_profile(cfg, num_processes=int(os.environ.get("WORLD_SIZE", "1")))


def length_in_steps(cfg, batches_per_epoch: int, say=print):
    """training.max_epochs, when set, becomes max_steps (the loop and the LR schedule count steps);
    `say` tells the user. Otherwise `cfg` unchanged."""
    training = cfg.training
    if training.max_epochs is None:
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.training.max_steps = training.steps_for_epochs(batches_per_epoch)
    say(f"training.max_epochs = {training.max_epochs}: {cfg.training.max_steps} optimizer steps ({batches_per_epoch} "
        f"batches per epoch per process, accumulation {training.gradient_accumulation_steps}); it replaces "
        "training.max_steps")
    return cfg


def make_accelerator(training, logging_cfg, output_dir: Path):
    """The run's `Accelerator`: devices, mixed precision, accumulation, trackers, the process group."""
    # Accelerate keeps one state per process; a second run in the same process (a notebook, the
    # tests) may ask for another mixed precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)

    cuda = torch.cuda.is_available()
    if not cuda and not training.allow_cpu:
        raise ConfigError("training.allow_cpu = false and no CUDA GPU was found")
    if not cuda and training.mixed_precision == "fp16":
        raise ConfigError("training.mixed_precision = 'fp16' needs a CUDA GPU; use 'bf16' or 'no' on the CPU")
    if cuda:
        # fp32 matmuls (mixed_precision = "no", the fp32 parts of autocast) run on TF32 tensor cores.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    report_to = None if logging_cfg.report_to == "none" else logging_cfg.report_to
    if report_to == "wandb" and not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")  # no key, no network: log locally, sync later
    accelerator = Accelerator(
        # Without cpu=True, `accelerate launch --multi_gpu` on a CPU machine starts processes that
        # each train alone; with it they form a gloo group.
        cpu=not cuda,
        mixed_precision=training.mixed_precision,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # Used when this call creates the process group (the first run in a process).
        kwargs_handlers=[InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)],
    )
    if not cuda:
        fsdp_on_cpu(accelerator)
    return accelerator


def check_parallelism(training, memory, *, fsdp_version: int | None, num_processes: int, renders: bool,
                      embeddings: bool = False) -> None:
    """Refuse launch/config pairs that would train wrongly; `accelerate launch` decides FSDP and the count.

    Args:
        fsdp_version: None without FSDP, else the launcher's --fsdp_version.
        renders: the run renders samples or computes a validation loss (a forward on one process).
        embeddings: the run trains [[embeddings]] words.

    Raises:
        ConfigError: naming the key or the launch flag to change.
    """
    problems = []
    if embeddings and num_processes > 1:
        problems.append("[[embeddings]] train on one process for now (their rows sit outside DDP's reach): "
                        "launch without --multi_gpu")
    if memory.fused_backward and (num_processes > 1 or fsdp_version):
        problems.append("memory.fused_backward = true steps each GPU on its own gradients before DDP/FSDP averages "
                        "them: run one process without FSDP, or set memory.fused_backward = false")
    if fsdp_version:
        if fsdp_version != 2:
            problems.append("FSDP: launch with --fsdp_version 2 (FSDP1 flattens the parameters the optimizer holds)")
        if training.method != "full":
            problems.append("FSDP shards full fine-tuning; a LoRA fits on each GPU: launch with --multi_gpu (DDP) "
                            "instead of --use_fsdp, or set training.method = 'full'")
        if training.train_text_encoder:
            problems.append("FSDP shards the UNet only: set training.train_text_encoder = false")
        if training.ema_decay:
            problems.append("FSDP keeps sharded weights, which the EMA copy cannot follow: unset training.ema_decay")
        if renders:
            problems.append("FSDP needs every process in each forward, and samples and the validation loss run on "
                            "one: set sample.prompts = [] and validation.split = 0, and sample the saved model")
    if problems:
        raise ConfigError("; ".join(problems))


def compile_unet(unet, cache_dir: Path, mode: str = "default"):
    """torch.compile for bucketed training: one static graph per bucket shape, kernels kept between runs."""
    # Buckets make shapes static: dynamic=False compiles each bucket shape once as a static graph
    # (no symbolic-shape graph after the second shape), and the limit leaves room for every bucket.
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    # Inductor's kernels live with the other caches, so the next run (or a resume) reuses them.
    # Importing diffusers already wrote torch's default folder into the variable: only a folder
    # the user chose is kept.
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    return torch.compile(unet, dynamic=False, mode=mode)


def prepare_unet(unet, training, memory, lora_cfg, device: torch.device | None = None):
    """Freeze or unfreeze the UNet, add adapters, cast; return the trainable parameters.

    LoRA: base weights in `memory.base_dtype` (fp8/nf4: the transformer Linears quantized, the
    rest in the compute dtype), adapter weights fp32. Full: every UNet weight is
    trained, in `memory.weight_dtype` (fp32 master weights, or bf16 rounded stochastically by the
    fused optimizer); autocast gives the bf16/fp16 speed.
    """
    unet.requires_grad_(False)
    if training.method in ("lora", "embedding"):  # embedding: the UNet stays frozen, without adapters
        quantized = memory.base_dtype in ("fp8", "nf4")
        # Under a quantized base the layers it leaves (convs, embeddings, norms) are in the compute dtype.
        compute_dtype = DTYPES["fp16" if training.mixed_precision == "fp16" else "bf16"]
        unet.to(dtype=compute_dtype if quantized else DTYPES[memory.base_dtype])
        if quantized:
            # Before the adapters, so peft wraps the quantized layers; layer by layer onto the device,
            # so the full-precision base never sits on the GPU whole.
            quantize_base_linears(unet, memory.base_dtype, compute_dtype, device=device)
        if training.method == "lora":
            add_unet_adapter(unet, lora_cfg)
        if training.method == "lora" and lora_cfg.init_from is not None:
            load_adapter_weights(unet, None, lora_cfg.init_from)
    else:
        # fp32 master weights, or bf16 weights that the fused optimizer rounds stochastically.
        unet.to(dtype=DTYPES[memory.weight_dtype])
        unet.requires_grad_(True)
    params = [p for p in unet.parameters() if p.requires_grad]
    if training.method != "full":
        for p in params:
            p.data = p.data.float()  # adapters stay fp32 whatever the base precision
    if memory.channels_last:
        unet.to(memory_format=torch.channels_last)  # 4-D conv weights only; Linear layers are unaffected
    if memory.gradient_checkpointing:
        enable_checkpointing(unet, memory.checkpointing_mode)
    unet.train()
    return params


def unet_param_groups(unet, learning_rate: float, block_lr_scale: dict[str, float]) -> list[dict]:
    """The UNet's trained parameters as optimizer groups: one per `block_lr_scale` prefix, the rest at `learning_rate`.

    Raises:
        ConfigError: a prefix matches no trained parameter.
    """
    patterns = {prefix: re.compile(block_pattern(prefix) + "$") for prefix in block_lr_scale}
    groups: dict[str | None, list] = {None: [], **{prefix: [] for prefix in block_lr_scale}}
    for name, param in unet.named_parameters():
        if param.requires_grad:
            matching = [prefix for prefix, pattern in patterns.items() if pattern.match(name)]
            groups[max(matching, key=len) if matching else None].append(param)  # the most specific prefix wins
    empty = [prefix for prefix, params in groups.items() if prefix is not None and not params]
    if empty:
        raise ConfigError(f"training.block_lr_scale: {', '.join(map(repr, empty))} match no trained parameter; use "
                          "diffusers block paths like 'down_blocks.1', 'mid_block' or 'up_blocks.0.attentions.1'")
    return [{"params": params, "lr": learning_rate * (1.0 if prefix is None else block_lr_scale[prefix])}
            for prefix, params in groups.items() if params]


def lora_plus_groups(groups: list[dict], models, ratio: float) -> list[dict]:
    """LoRA+ (Hayou et al. 2024): each group's `up` (peft lora_B) matrices at `ratio` × its learning rate.

    `down`, DoRA magnitudes and anything else stay at the group's rate; groups keep their order.
    """
    ups = {id(p) for model in models for name, p in model.named_parameters() if ".lora_B." in name}
    out = []
    for group in groups:
        rest = [p for p in group["params"] if id(p) not in ups]
        fast = [p for p in group["params"] if id(p) in ups]
        out += [{**group, "params": params, "lr": group["lr"] * scale}
                for params, scale in ((rest, 1.0), (fast, ratio)) if params]
    return out


def build_training_optimizer(groups: list[dict], training, memory, optimizer_cfg) -> torch.optim.Optimizer:
    """The configured optimizer, or with memory.fused_backward one per tensor stepped inside backward.

    Build it once the trained weights are on their device (fused AdamW, the fused backward's stand-ins).
    """
    if not memory.fused_backward:
        return build_optimizer(groups, optimizer_cfg, training.learning_rate)

    # Each gradient is clipped (per tensor), applied and freed as soon as backward completes it.
    return FusedBackwardOptimizer(
        groups, lambda group: build_optimizer(group, optimizer_cfg, training.learning_rate),
        max_grad_norm=training.max_grad_norm, stochastic_rounding=memory.weight_dtype == "bf16",
        seed=training.seed)


def prepare_text_encoders(text_encoders, training, memory, lora_cfg) -> list:
    """Make both text encoders trainable (LoRA adapters, or every weight for full); return their parameters."""
    for encoder in text_encoders:
        encoder.requires_grad_(False)
    if training.method == "lora":
        add_text_encoder_adapters(text_encoders, lora_cfg)
    else:
        for encoder in text_encoders:
            encoder.requires_grad_(True)
    params = [p for encoder in text_encoders for p in encoder.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    for encoder in text_encoders:
        if memory.gradient_checkpointing:
            encoder.gradient_checkpointing_enable()
        encoder.train()
    return params


def prepare_trained_models(models, training: TrainingConfig, memory: MemoryConfig, lora_cfg: LoraConfig,
                           device: torch.device | None, words=None) -> tuple[list[dict], list]:
    """Adapters (or trainable weights) on the UNet and, with training.train_text_encoder, both text
    encoders; their parameters as optimizer groups (block LR scales, LoRA+ applied). `words`
    (NewWords, [[embeddings]]): their rows join as a group at training.embedding_lr.

    Returns:
        (param groups, the text encoders' trained parameters)
    """
    prepare_unet(models.unet, training, memory, lora_cfg, device=device)
    groups = unet_param_groups(models.unet, training.learning_rate, training.block_lr_scale)
    te_params = []
    if training.train_text_encoder:
        te_params = prepare_text_encoders(models.text_encoders, training, memory, lora_cfg)
        groups.append({"params": te_params, "lr": training.text_encoder_lr or training.learning_rate})
    if lora_cfg.plus_ratio and training.method == "lora":
        groups = lora_plus_groups(groups, [models.unet, *models.text_encoders], lora_cfg.plus_ratio)
    if words is not None:
        te_params = te_params + words.trained_parameters()
        groups.append({"params": words.trained_parameters(), "lr": training.embedding_lr or training.learning_rate})
    return groups, te_params


class TrainData(NamedTuple):
    manifest: object  # the training rows (validation rows held out)
    dataset: TrainDataset
    val_dataset: TrainDataset | None
    loader: object  # torch DataLoader over `sampler`
    sampler: object  # BucketBatchSampler: its position is part of every checkpoint


def build_data(manifest, latents, text, dataset_cfg: DatasetConfig, training: TrainingConfig, loss: LossConfig,
               validation: ValidationConfig, num_replicas: int, rank: int, kind: str = "base") -> TrainData:
    """Hold out validation rows (validation.split), build both datasets and this process's bucket loader.

    `kind` ("base" or "refiner") picks the micro-conditioning the datasets read from the rows."""
    train_rows, val_rows = split_rows(list(manifest["fingerprint"]), validation.split, training.seed)

    def dataset_for(rows):
        return TrainDataset(manifest.select(rows), dataset_cfg, seed=training.seed,
                            prior_loss_weight=loss.prior_loss_weight, masked=loss.masked,
                            latents=latents.subset(rows) if latents else None, text=text, kind=kind)

    rows = manifest.select(train_rows) if val_rows else manifest
    dataset = dataset_for(train_rows)
    loader, sampler = build_dataloader(dataset, rows, dataset_cfg, batch_size=training.batch_size,
                                       seed=training.seed, num_replicas=num_replicas, rank=rank)
    return TrainData(rows, dataset, dataset_for(val_rows) if val_rows else None, loader, sampler)


def build_ema(params: list, decay: float):
    """An exponential moving average of the trained parameters (diffusers' EMAModel)."""
    from diffusers.training_utils import EMAModel  # diffusers' training utilities, only with EMA

    return EMAModel(params, decay=decay)


def lora_layers_of(models) -> list:
    """Every peft LoRA layer of `models`, found once (lora.max_norm bounds them after each step)."""
    return [layer for model in models for _, layer in lora_layers(model)]


@dataclass
class TrainedParts:
    """What the optimizer steps, as Accelerate prepared it: `build_trained_parts` makes it, the recipe runs it."""

    unet: torch.nn.Module  # the UNet as Accelerate prepared it (DDP/FSDP/compile wrappers)
    optimizer: object  # Accelerate's wrapper of the torch (or bitsandbytes) optimizer
    lr_scheduler: object  # stepped once per optimizer step by the recipe, saved with the Accelerate state
    params: list  # exactly what the optimizer steps (FSDP: the shards); clipping and EMA read these
    trained_models: list  # `accelerator.accumulate` skips gradient sync on each of them
    activations: object = field(default_factory=contextlib.nullcontext)  # saved-activation hooks per forward
    fused: object = None  # the optimizer, when it steps inside backward (memory.fused_backward)
    fsdp: bool = False
    ema: object = None  # diffusers EMAModel of `params` (training.ema_decay)
    norm_bounded: list = field(default_factory=list)  # lora.max_norm: the LoRA layers it bounds


def build_trained_parts(acc, models, training: TrainingConfig, memory: MemoryConfig, optimizer_cfg: OptimizerConfig,
                        lora_cfg: LoraConfig, *, renders: bool, compile_dir: Path, words=None) -> TrainedParts:
    """Adapters (or full weights), optimizer, LR schedule, EMA; Accelerate wraps them and registers
    what a checkpoint must hold besides the models and the optimizer.

    Args:
        renders: the run renders samples or computes a validation loss (FSDP refuses both).
        compile_dir: where torch.compile keeps its kernels (memory.compile).
        words: NewWords, the [[embeddings]] rows, or None.
    """
    fsdp = acc.distributed_type == DistributedType.FSDP
    check_parallelism(training, memory, fsdp_version=acc.state.fsdp_plugin.fsdp_version if fsdp else None,
                      num_processes=acc.num_processes, renders=renders, embeddings=words is not None)
    groups, te_params = prepare_trained_models(models, training, memory, lora_cfg,
                                               device=None if fsdp else acc.device, words=words)
    if not fsdp:
        # On the device before the optimizer: AdamW picks its fused CUDA kernel there, and the fused
        # backward's fp32 stand-ins sit beside their weights. (FSDP places the shards itself.)
        models.unet.to(acc.device)
    optimizer = build_training_optimizer(groups, training, memory, optimizer_cfg)
    # The recipe steps the LR scheduler once per optimizer step; `prepare` would step it once per
    # process. Registered, it is still saved and restored with the Accelerate state.
    lr_scheduler = build_lr_scheduler(optimizer, optimizer_cfg, training.max_steps)
    unet = models.unet
    if memory.compile and acc.device.type == "cuda":
        unet = compile_unet(unet, compile_dir, memory.compile_mode)
    elif memory.compile:
        acc.print("memory.compile is CUDA-only: running eagerly on the CPU")
    unet, prepared = acc.prepare(unet, optimizer)
    # FSDP swaps each UNet parameter for its shard: clipping and EMA must see what the optimizer steps.
    params = [p for p in unet.parameters() if p.requires_grad] + te_params
    parts = TrainedParts(unet, prepared, lr_scheduler, params, [unet], fsdp=fsdp,
                         activations=saved_activations(memory.gradient_checkpointing, memory.checkpointing_mode,
                                                       acc.device, unet),
                         fused=optimizer if memory.fused_backward else None)
    if training.train_text_encoder:
        models.text_encoder, models.text_encoder_2 = acc.prepare(models.text_encoder, models.text_encoder_2)
        parts.trained_models += [models.text_encoder, models.text_encoder_2]
    acc.register_for_checkpointing(lr_scheduler)
    if words is not None:  # the words' rows (their optimizer state is the optimizer's)
        acc.register_for_checkpointing(words)
    if training.ema_decay:  # the EMA copy lives beside the trained weights, saved and restored with them
        parts.ema = build_ema(params, training.ema_decay)
        acc.register_for_checkpointing(parts.ema)
    if not fsdp:  # FSDP saves its shards itself; a full fine-tune trains every weight anyway
        ckpt.register_trainable_only_hooks(acc)
    if lora_cfg.max_norm and training.method == "lora":
        bare = acc.unwrap_model(unet, keep_torch_compile=False)
        parts.norm_bounded = lora_layers_of([bare, *(models.text_encoders if training.train_text_encoder else ())])
    return parts
