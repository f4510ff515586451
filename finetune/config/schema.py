"""The typed training config: one pydantic model per table of `train_config.toml`, defaults here only.

A key marked `FROZEN` (or a whole table marked so in `TrainConfig`) cannot change on `--resume`:
changing it would make "continue exactly" a lie. `finetune.train.checkpoint` reads the marks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

# Section, _resolve and FROZEN live in base.py and the [dataset] tables in data.py; they are
# re-exported here, so `finetune.config.schema` still names every table.
from finetune.config.base import FROZEN, Section, _resolve
from finetune.config.data import DatasetConfig, SubsetConfig  # noqa: F401 (re-exported)
from finetune.config.embeddings import EmbeddingConfig, EmbeddingTrainingKeys, embedding_problems

# The lora.variant values peft can train on each quantized base (peft 0.21): DoRA reads the fp8
# weight without its scale; LoHa/LoKr expect a dense weight, not bitsandbytes' packed one.
# Optimizer betas when the config sets none: Adam's and Lion's papers' values.
ADAM_BETAS, LION_BETAS = (0.9, 0.999), (0.9, 0.99)

QUANTIZED_BASE_VARIANTS = {"nf4": ("lora", "dora"), "fp8": ("lora", "loha", "lokr")}


class ModelConfig(Section):
    pretrained: Path = Field(description="SDXL as a local diffusers folder or a single-file .safetensors.")
    vae: Path | None = Field(None, description="Optional separate VAE (diffusers folder or .safetensors).")
    config: Path | None = Field(None, description="For a single file whose architecture is not SDXL base's: a "
                                "diffusers folder with its configs and tokenizers (weights are not needed).")
    allow_pickle: bool = Field(False, description="Allow pickled .ckpt/.pt files (loaded with weights_only=True).")
    name: str | None = Field(None, description="Base model name written into adapter metadata (default: folder/file name).")
    kind: Literal["auto", "base", "refiner"] = Field("auto", description="SDXL base or refiner ('auto': from the weights).")

    _paths = field_validator("pretrained", "vae", "config")(_resolve)

    @model_validator(mode="after")
    def _exists(self) -> ModelConfig:
        for key in ("pretrained", "vae", "config"):
            path = getattr(self, key)
            if path is not None and not path.exists():
                raise ValueError(f"{key}: path does not exist: {path} (point it at a local SDXL diffusers folder or .safetensors file)")
        return self


class TrainingConfig(EmbeddingTrainingKeys, Section):  # embedding_lr, embedding_stop_*: embeddings.py
    method: Literal["lora", "full", "embedding"] = Field("lora", json_schema_extra=FROZEN, description="LoRA adapters (peft), full fine-tuning of the UNet, or [[embeddings]] words only.")
    max_steps: int = Field(1000, ge=1, description="Optimizer steps to train.")
    max_epochs: int | None = Field(None, ge=1, description="Train this many passes over the dataset instead; "
                                   "when set it replaces max_steps (as kohya's max_train_epochs does).")
    batch_size: int = Field(1, json_schema_extra=FROZEN, ge=1, description="Images per step per process.")
    gradient_accumulation_steps: int = Field(1, json_schema_extra=FROZEN, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(1e-4, json_schema_extra=FROZEN, gt=0, description="UNet learning rate (LoRA: 1e-4; full: 1e-6..1e-5).")
    text_encoder_lr: float | None = Field(None, json_schema_extra=FROZEN, gt=0, description="Text-encoder learning rate (default: learning_rate).")
    block_lr_scale: dict[str, float] = Field(default_factory=dict, json_schema_extra=FROZEN, description="Per-block learning-rate multipliers by "
                                             "diffusers path, e.g. {\"mid_block\" = 0.5, \"up_blocks.0\" = 0}; the longest "
                                             "matching prefix wins, 0 freezes that block.")
    train_text_encoder: bool = Field(False, json_schema_extra=FROZEN, description="Also train both text encoders (needs cache.text = false).")
    seed: int = Field(42, json_schema_extra=FROZEN, ge=0, le=2**32 - 1, description="Seed of noise, timesteps, shuffling and dropout.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("bf16", description="Autocast precision; fp16 uses loss scaling.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping (0 = off).")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="Keep an EMA of the trained weights (UNet or "
                                    "adapter) with this decay, and write it as the result; 0.999 is common.")
    max_nan_steps: int = Field(5, ge=1, description="Stop after this many non-finite losses in a row.")
    allow_cpu: bool = Field(True, description="Run on the CPU when no GPU is found (tests, quickstart).")

    @field_validator("block_lr_scale")
    @classmethod
    def _scales(cls, value: dict[str, float]) -> dict[str, float]:
        negative = {k: v for k, v in value.items() if v < 0}
        if negative:
            raise ValueError(f"multipliers must be >= 0, got {negative}")
        return value

    @property
    def effective_batch_size(self) -> int:
        """Images per optimizer step on one process."""
        return self.batch_size * self.gradient_accumulation_steps

    def steps_for_epochs(self, batches_per_epoch: int) -> int:
        """Optimizer steps in `max_epochs` passes of `batches_per_epoch` micro-batches each: an epoch is one
        pass, its last accumulation window steps with the micro-batches it has."""
        return max(1, self.max_epochs * math.ceil(batches_per_epoch / self.gradient_accumulation_steps))  # = finetune.plan's


class MemoryConfig(Section):
    """What the memory profiles set: precision of the weights, activation checkpointing, compile."""

    profile: Literal["auto", "min_vram", "low_vram", "balanced", "fast", "custom"] = Field(
        "auto", description="A named set of the keys below (finetune/memory/profiles.py), chosen by name or by "
        "`auto` from the GPU's free memory; keys you set yourself win. 'custom': none.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: much less memory, ~30% slower.")
    checkpointing_mode: Literal["full", "transformer", "resnet", "offload"] = Field(
        "full", description="With gradient_checkpointing: recompute every block (full), only transformer blocks or "
        "only ResNets (less recompute, more memory), or recompute nothing and offload activations to CPU memory.")
    base_dtype: Literal["fp32", "bf16", "fp16", "fp8", "nf4"] = Field(
        "fp32", json_schema_extra=FROZEN,
        description="Precision of frozen base weights (trained parameters stay fp32). LoRA only: fp8 (per-channel scales)"
        " or nf4 (bitsandbytes) store the transformer blocks' Linear layers in 1 or 0.5 bytes per weight.")
    fused_backward: bool = Field(False, json_schema_extra=FROZEN,
                                 description="Full fine-tuning: step the optimizer inside backward, one tensor at a time"
                                 ", so the whole UNet's gradients never exist at once (~5 GB less for SDXL in "
                                 "bf16). Clipping is then per tensor; no gradient accumulation, one process.")
    weight_dtype: Literal["fp32", "bf16"] = Field("fp32", json_schema_extra=FROZEN,
                                                  description="Full fine-tuning: trained weights in fp32, or in bf16 with stochastic rounding and no fp32 copy (needs fused_backward).")
    compile: bool = Field(False, description="torch.compile the UNet once per bucket shape (CUDA only; ignored on CPU).")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode: reduce-overhead replays each bucket's step as a CUDA graph "
        "(fewer kernel launches, more memory); max-autotune-no-cudagraphs tunes kernels (slow first step).")
    channels_last: bool = Field(False, description="UNet convolutions in channels-last memory layout (often faster "
                                "in bf16 on tensor cores; measure with scripts/benchmark.py --channels-last).")


class LoraConfig(Section):
    rank: int = Field(16, ge=1, description="Adapter rank: 8-32 for styles and characters.")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: the update is (alpha/rank)·up@down.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    targets: Literal["attn", "attn_ff", "locon"] = Field("attn", description="attn: attention projections; attn_ff: + feed-forward; locon: + ResNet convs and samplers.")
    variant: Literal["lora", "dora", "loha", "lokr"] = Field("lora", description="peft adapter type.")
    plus_ratio: float | None = Field(None, gt=0, description="LoRA+: the up matrices learn this many times faster "
                                     "than the down ones (16 in the paper; kohya's loraplus_lr_ratio). LoRA/DoRA only.")
    max_norm: float | None = Field(None, gt=0, description="After each step, shrink any module whose change "
                                   "‖(alpha/rank)·up@down‖ exceeds this (kohya's scale_weight_norms; 1.0 is common). "
                                   "LoRA/DoRA only.")
    text_encoder_rank: int | None = Field(None, ge=1, description="Rank of the text-encoder adapters (default: rank).")
    block_ranks: dict[str, int] = Field(default_factory=dict, description="Per-block rank overrides, e.g. {\"down_blocks.1\" = 4}.")
    format: Literal["kohya", "diffusers"] = Field("kohya", description="Adapter file keys: kohya (A1111/Forge/ComfyUI) or diffusers (PEFT).")
    init_from: Path | None = Field(None, description="Start from an existing LoRA file (kohya, diffusers or OneTrainer naming).")

    _paths = field_validator("init_from")(_resolve)

    @model_validator(mode="after")
    def _up_down_only(self) -> LoraConfig:
        if self.variant in ("lora", "dora"):
            return self
        if self.plus_ratio is not None:
            raise ValueError(f"plus_ratio: LoRA+ speeds up LoRA's up matrices; lora.variant = '{self.variant}' has "
                             "none (use variant 'lora' or 'dora', or unset plus_ratio)")
        if self.max_norm is not None:
            raise ValueError(f"max_norm: bounds LoRA's up @ down; lora.variant = '{self.variant}' has no such "
                             "product (use variant 'lora' or 'dora', or unset max_norm)")
        return self


class OptimizerConfig(Section):
    name: Literal["adamw", "adamw8bit", "paged_adamw8bit", "lion8bit", "adafactor", "prodigy"] = Field(
        "adamw", json_schema_extra=FROZEN, description="adamw8bit/lion8bit need bitsandbytes; prodigy needs prodigyopt.")
    weight_decay: float = Field(1e-2, ge=0)
    betas: tuple[float, float] | None = Field(None, description="Adam/Lion betas; default (0.9, 0.999), Lion's "
                                              "own (0.9, 0.99) for lion8bit. Resolved at load, so a run's saved config "
                                              "holds the betas it used.")
    eps: float = Field(1e-8, gt=0)
    relative_step: bool = Field(False, description="Adafactor: its own relative step size instead of learning_rate.")
    scheduler: Literal["constant", "cosine", "cosine_with_restarts", "linear", "polynomial"] = Field("constant", json_schema_extra=FROZEN)
    warmup_steps: int = Field(0, json_schema_extra=FROZEN, ge=0, description="Linear warmup from 0 to the learning rate.")
    num_cycles: int = Field(1, ge=1, json_schema_extra=FROZEN, description="cosine_with_restarts: number of restarts.")
    power: float = Field(1.0, gt=0, json_schema_extra=FROZEN, description="polynomial: decay power.")

    @model_validator(mode="after")
    def _default_betas(self) -> OptimizerConfig:
        if self.betas is None:  # an explicit value from here on: a saved config reloads to the same optimizer
            self.betas = LION_BETAS if self.name.startswith("lion") else ADAM_BETAS
        return self


class LossConfig(Section):
    type: Literal["l2", "huber", "smooth_l1"] = Field("l2")
    huber_c: float = Field(0.1, gt=0, description="Huber/smooth-L1 threshold.")
    min_snr_gamma: float | None = Field(None, gt=0, description="Min-SNR-γ weighting (5.0 is the paper's value).")
    debiased_estimation: bool = Field(False, description="Weight each timestep by 1/√SNR (kohya's "
                                      "debiased_estimation_loss); with min_snr_gamma the two weights multiply.")
    noise_offset: float = Field(0.0, ge=0, description="Offset noise strength (0.0357 is common for SDXL).")
    noise_offset_random_strength: bool = Field(False, description="Draw each sample's offset strength from "
                                               "[0, noise_offset) (kohya's noise_offset_random_strength).")
    multires_noise_iterations: int | None = Field(None, ge=1, description="kohya's multi-resolution (pyramid) "
                                                  "noise: add this many coarser noise levels (6-10 is common; "
                                                  "unset = off).")
    multires_noise_discount: float = Field(0.3, gt=0, le=1, description="Weight of each coarser level relative to "
                                           "the one above (kohya's default 0.3).")
    input_perturbation: float = Field(0.0, ge=0, description="Perturb the noise fed to the model (0.1 in the paper).")
    zero_terminal_snr: bool = Field(False, description="Rescale betas to zero terminal SNR (v-prediction models).")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field("auto", description="auto: from the scheduler config.")
    masked: bool = Field(False, description="Weight the loss by mask images found beside the images.")
    prior_loss_weight: float = Field(1.0, ge=0, description="Loss weight of regularization (prior-preservation) images.")
    min_timestep: int = Field(0, ge=0, description="Train on timesteps from this one (0 = the noise-free end).")
    max_timestep: int | None = Field(None, ge=1, description="…up to this one, exclusive (default: the model's "
                                     "range, all of the scheduler's 1000 for a base, 200 for a refiner; a run's "
                                     "saved config holds the value). Lower it for detail, raise min for composition.")

    @model_validator(mode="after")
    def _timesteps(self) -> LossConfig:
        if self.max_timestep is not None and self.min_timestep >= self.max_timestep:
            raise ValueError(f"min_timestep: {self.min_timestep} must be below max_timestep {self.max_timestep}")
        return self


class CacheConfig(Section):
    latents: bool = Field(True, description="Encode images with the VAE once, before training.")
    text: bool = Field(True, description="Encode captions with both text encoders once, before training.")
    dir: Path | None = Field(None, description="Cache folder (default: <output.dir>/cache).")
    dtype: Literal["fp16", "bf16", "fp32"] = Field("fp16", description="Storage precision of cached latents and embeddings.")
    latent_std: bool = Field(True, json_schema_extra=FROZEN, description="Store the latent distribution's mean and std and sample each step (as SDXL trains).")
    in_memory: bool = Field(False, description="Hold the whole cache in RAM (small datasets).")
    batch_size: int = Field(4, ge=1, description="Images per VAE/text-encoder call while caching.")

    _paths = field_validator("dir")(_resolve)


class CheckpointConfig(Section):
    every_n_steps: int = Field(500, ge=1, description="Save a resumable checkpoint every N optimizer steps (and at the end).")
    every_n_epochs: int | None = Field(None, ge=1, description="Also save one after every N epochs (at the first "
                                       "optimizer step that ends or follows the epoch's last batch).")
    keep_last: int = Field(3, ge=1, description="Keep this many checkpoints; older ones are deleted.")
    keep_weights: bool = Field(False, description="Before deleting an old checkpoint, move its LoRA/UNet file to "
                                "<output.dir>/<name>-step-NNNNNN.safetensors, to compare epochs or steps later.")


class SampleConfig(Section):
    prompts: list[str] = Field(default_factory=list, description="Prompts rendered with the current weights.")
    negative_prompt: str = Field("", description="Negative prompt of every sample (used when guidance_scale > 1).")
    seeds: list[int] = Field(default_factory=lambda: [0], description="One image per prompt and seed.")
    every_n_steps: int = Field(0, ge=0, description="Render samples every N steps (0: only at the end).")
    every_n_epochs: int | None = Field(None, ge=1, description="Also render them after every N epochs.")
    steps: int = Field(25, ge=1, description="Denoising steps.")
    guidance_scale: float = Field(5.0, ge=0)
    height: int | None = Field(None, ge=64, description="Sample height (default: dataset.resolution).")
    width: int | None = Field(None, ge=64, description="Sample width (default: dataset.resolution).")
    base: Path | None = Field(None, description="Refiner runs: the SDXL base of the first stage (else a dataset image).")
    switch: float = Field(0.8, gt=0, lt=1, description="Refiner runs: share of the schedule the base denoises.")
    strength: float = Field(0.3, gt=0, le=1, description="Refiner runs without a base: img2img strength.")
    _paths = field_validator("base")(_resolve)


class ValidationConfig(Section):
    split: float = Field(0.0, ge=0, lt=1, description="Fraction of images held out for validation loss (0 = off).")
    every_n_steps: int = Field(100, ge=1, description="Compute validation loss every N steps.")
    timesteps: list[int] = Field(default_factory=lambda: [100, 300, 500, 700, 900], description="Fixed timesteps of the validation loss.")


class OutputConfig(Section):
    dir: Path = Field(Path("output"), validate_default=True, description="Folder for manifest, caches, checkpoints, adapter, samples and logs.")
    name: str = Field("lora", min_length=1, description="File stem of the final adapter: <dir>/<name>.safetensors.")
    save_dtype: Literal["fp16", "bf16", "fp32"] = Field("fp16", description="Precision of the written weights (the "
                                                        "LoRA or UNet .safetensors; resumable state stays exact). "
                                                        "fp16 loads everywhere at half the size of fp32.")

    _paths = field_validator("dir")(_resolve)

    @property
    def adapter_path(self) -> Path:
        return self.dir / f"{self.name}.safetensors"

    @property
    def checkpoints_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def manifest_dir(self) -> Path:
        return self.dir / "manifest"


class LoggingConfig(Section):
    report_to: Literal["none", "tensorboard", "wandb"] = Field("none")
    project: str = Field("sdxl-finetune", description="Tracker project name.")
    every_n_steps: int = Field(10, ge=1, description="Log metrics every N steps.")


class TrainConfig(Section):
    model: ModelConfig = Field(json_schema_extra=FROZEN)
    dataset: DatasetConfig = Field(json_schema_extra=FROZEN)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig, json_schema_extra=FROZEN)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    loss: LossConfig = Field(default_factory=LossConfig, json_schema_extra=FROZEN)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    embeddings: list[EmbeddingConfig] = Field(default_factory=list, json_schema_extra=FROZEN, description="New words.")

    @model_validator(mode="before")
    @classmethod
    def _tables_present(cls, data: Any) -> Any:
        # Validate omitted tables too, so their defaults see the context (paths resolve the same way).
        if isinstance(data, dict):
            data = {**{name: {} for name in cls.model_fields if name not in ("model", "dataset", "embeddings")}, **data}
        return data

    @model_validator(mode="after")
    def _cross_field_rules(self) -> TrainConfig:
        problems = self.cross_field_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def cross_field_problems(self) -> list[str]:
        """Settings that are each valid but contradict one another (memory profiles check them too)."""
        # A cached embedding is one fixed text per caption; anything that changes the text or the
        # encoder per step would make the cache silently wrong.
        problems = []
        if self.cache.text:
            if self.dataset.shuffle_tags:
                problems.append("dataset.shuffle_tags = true changes captions every step; set cache.text = false to use it")
            if self.dataset.tag_dropout > 0:
                problems.append("dataset.tag_dropout > 0 changes captions every step; set cache.text = false to use it")
            if self.training.train_text_encoder:
                problems.append("training.train_text_encoder = true changes the embeddings; set cache.text = false to use it")
        if self.memory.base_dtype != "fp32" and self.training.mixed_precision == "no":
            problems.append(f"memory.base_dtype = '{self.memory.base_dtype}' needs autocast: set "
                            "training.mixed_precision = 'bf16' (or 'fp16'), or base_dtype = 'fp32'")
        problems += self._quantized_base_problems() + self._full_finetune_problems() + embedding_problems(self.training, self.embeddings)
        if self.cache.latents and self.dataset.crop == "random":
            problems.append("dataset.crop = 'random' gives a new crop every epoch; set cache.latents = false or dataset.crop = 'center'")
        if self.training.max_epochs is None and self.optimizer.warmup_steps >= self.training.max_steps:
            problems.append(f"optimizer.warmup_steps = {self.optimizer.warmup_steps} must be below training.max_steps "
                            f"= {self.training.max_steps}: the learning rate would never reach its value")
        if self.training.block_lr_scale and self.optimizer.name == "adafactor" and self.optimizer.relative_step:
            problems.append("training.block_lr_scale needs learning rates, which optimizer.relative_step = true "
                            "ignores: set relative_step = false")
        return problems

    def ignored_settings(self) -> list[str]:
        """Settings that are valid but do nothing in this run: warnings, not errors, since a config often
        keeps its [lora] table while training.method switches to full (the tests' configs do)."""
        if self.training.method == "lora":
            return []
        fields = LoraConfig.model_fields
        changed = sorted(key for key in self.lora.model_fields_set
                         if getattr(self.lora, key) != fields[key].get_default(call_default_factory=True))
        if not changed:  # a resolved config writes every key at its default: nothing the user set is lost
            return []
        keys = ", ".join(f"lora.{key} = {getattr(self.lora, key)!r}" for key in changed)
        return [f"{keys}: training.method = '{self.training.method}' trains no LoRA, so [lora] is ignored; "
                "remove the [lora] table or set method = \"lora\""]

    def _quantized_base_problems(self) -> list[str]:
        kind = self.memory.base_dtype
        if kind not in QUANTIZED_BASE_VARIANTS:
            return []
        if self.training.method == "full":
            return [f"memory.base_dtype = '{kind}' quantizes frozen weights: it needs training.method = 'lora'"]
        if self.training.method == "lora" and self.lora.variant not in QUANTIZED_BASE_VARIANTS[kind]:
            allowed = " or ".join(repr(v) for v in QUANTIZED_BASE_VARIANTS[kind])
            return [f"lora.variant = '{self.lora.variant}' cannot train on memory.base_dtype = '{kind}': use {allowed}, "
                    "or another base_dtype"]
        return []

    def fused_backward_blockers(self) -> dict[str, str]:
        """What memory.fused_backward cannot work with: a short name -> the problem and its remedy."""
        training, blockers = self.training, {}
        if training.method != "full":
            blockers["LoRA"] = "memory.fused_backward = true is for training.method = 'full' (a LoRA's gradients are small)"
        if training.gradient_accumulation_steps > 1:
            blockers["gradient accumulation"] = ("memory.fused_backward = true steps on every backward: set "
                                                 "training.gradient_accumulation_steps = 1 (raise batch_size instead)")
        if training.mixed_precision == "fp16":
            blockers["fp16"] = ("memory.fused_backward = true cannot unscale fp16 gradients that never coexist: "
                                "use training.mixed_precision = 'bf16'")
        if self.optimizer.name == "prodigy":
            blockers["prodigy"] = ("memory.fused_backward = true would give prodigy one step-size estimate per tensor: "
                                   "use adamw8bit or adafactor")
        return blockers

    def _full_finetune_problems(self) -> list[str]:
        training, memory = self.training, self.memory
        problems = list(self.fused_backward_blockers().values()) if memory.fused_backward else []
        if memory.weight_dtype == "bf16":
            if training.method != "full" or not memory.fused_backward:
                problems.append("memory.weight_dtype = 'bf16' (stochastic rounding) needs training.method = 'full' "
                                "and memory.fused_backward = true")
            if training.mixed_precision != "bf16":
                problems.append("memory.weight_dtype = 'bf16' needs training.mixed_precision = 'bf16'")
            if training.ema_decay:
                problems.append("memory.weight_dtype = 'bf16' would round EMA updates away: unset training.ema_decay")
        return problems

    @property
    def cache_dir(self) -> Path:
        return self.cache.dir or self.output.dir / "cache"


def frozen_keys() -> list[str]:
    """Dotted keys (or whole tables) marked FROZEN: what a resume must find unchanged."""
    keys = []
    for table, field in TrainConfig.model_fields.items():
        if (field.json_schema_extra or {}).get("frozen_on_resume"):
            keys.append(table)
            continue
        model = field.annotation
        for key, inner in getattr(model, "model_fields", {}).items():
            if (inner.json_schema_extra or {}).get("frozen_on_resume"):
                keys.append(f"{table}.{key}")
    return keys
