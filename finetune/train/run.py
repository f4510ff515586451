"""A training run's state and its steps: what `finetune.train.recipe` drives, one method per phase."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch

from finetune.train import checkpoint as ckpt
from finetune.config import TrainConfig, dump_config

log = logging.getLogger("finetune")


class Run:
    """Setup builds everything in order; the loop calls `micro_step`, `after_step`, `save_checkpoint`."""

    @classmethod
    def setup(cls, cfg: TrainConfig, progress: bool = True, resume: str | None = None) -> Run:
        """Build the run; each step needs what the step before it made."""
        from accelerate.utils import set_seed

        from finetune.train.plan import flat_config, print_plan
        from finetune.memory.profiles import apply_memory_profile
        from finetune.train.builders import make_accelerator

        self = cls()
        if resume and cfg.training.memory_profile == "auto":
            from finetune.train.checkpoint import profile_of_checkpoint

            cfg = profile_of_checkpoint(cfg, resume)
        # The launcher's process count (WORLD_SIZE), before the accelerator exists: the profile
        # decides the mixed precision the accelerator is built with.
        cfg, profile_message = apply_memory_profile(cfg, num_processes=int(os.environ.get("WORLD_SIZE", "1")))
        self.cfg, self.progress = cfg, progress
        self.accelerator = acc = make_accelerator(cfg.training, cfg.logging, cfg.output.dir)
        set_seed(cfg.training.seed)  # adapter init draws from the global RNG: same seed, same start
        acc.print(f"processes: {acc.num_processes} ({acc.device}, {acc.distributed_type.value}), "
                  f"mixed precision: {cfg.training.mixed_precision}")
        if profile_message:
            acc.print(profile_message)
        self._setup_manifest()
        latents, text = self._setup_models()  # caches are built here, so the models can leave the GPU
        self._setup_data(latents, text)  # needs the cache lookups
        cfg = self._set_length()  # max_epochs needs the batch count; the LR schedule needs the length
        self._setup_optimization()  # needs the models; the LR schedule needs the optimizer
        self.losses: list[float] = []
        self.epochs_done = 0  # whole passes over the data when the last optimizer step ended
        self.rendered_step: int | None = None
        self.val_losses: list[tuple[int, float]] = []
        self.last_checkpoint: Path | None = None
        self.started = time.time()
        if acc.is_main_process and cfg.logging.report_to != "none":
            # wandb writes beside TensorBoard's events (logs/), not into the shell's current folder.
            init_kwargs = {"wandb": {"dir": str(cfg.output.dir / "logs")}}
            (cfg.output.dir / "logs").mkdir(parents=True, exist_ok=True)
            acc.init_trackers(cfg.logging.project, config=flat_config(cfg.model_dump(mode="json")), init_kwargs=init_kwargs)
        print_plan(acc, cfg, len(self.loader), len(self.manifest), self.params, self.models.unet)
        return self

    def _setup_manifest(self) -> None:
        """The main process scans and writes the manifest; the others read what it wrote."""
        from bucketing.manifest import load_manifest
        from finetune.dataset import build_dataset
        from finetune.train.recipe import write_resolved_config

        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            info = build_dataset(cfg.dataset, cfg.training.seed, cfg.output.manifest_dir)
            acc.print(info.report_text)
            write_resolved_config(cfg)
        acc.wait_for_everyone()
        self.manifest = load_manifest(cfg.output.manifest_dir)

    def _setup_models(self):
        """Load SDXL, build the caches, and keep on the GPU only what training still needs."""
        from finetune.train.loss import make_noise_scheduler, resolve_prediction_type, timestep_range
        from finetune.models.load import load_models
        from finetune.cache.prepare import prepare_caches, release
        from finetune.models.text import encode_prompts

        cfg, acc = self.cfg, self.accelerator
        self.models = models = load_models(cfg.model, dtype=torch.float32)
        # Before the caches are built (minutes), not at the first step.
        timestep_range(models.noise_scheduler.config.num_train_timesteps, cfg.loss.min_timestep, cfg.loss.max_timestep)
        latents, text, self.cache_stats = prepare_caches(cfg, self.manifest, models, acc, progress=self.progress)
        # With both caches, the VAE and text encoders leave the GPU: only the UNet trains there.
        release(models.vae if latents else None, *(models.text_encoders if text else ()))
        if latents is None:
            models.vae.to(acc.device, dtype=torch.float32)
        if text is None:
            for encoder in models.text_encoders:
                encoder.to(acc.device)
        self.text_encode = lambda captions: encode_prompts(
            list(captions), models.tokenizers, tuple(models.text_encoders), cfg.dataset.long_captions)
        self.noise_scheduler = make_noise_scheduler(dict(models.noise_scheduler.config), cfg.loss.zero_terminal_snr)
        self.prediction_type = resolve_prediction_type(cfg.loss.prediction_type, self.noise_scheduler)
        return latents, text

    def _setup_optimization(self) -> None:
        """Adapters (or full weights), optimizer, LR schedule, EMA; then Accelerate wraps them."""
        from accelerate.utils import DistributedType

        from finetune.memory.activations import saved_activations
        from finetune.train.optim import build_lr_scheduler
        from finetune.train.builders import (build_training_optimizer, check_parallelism, compile_unet, lora_plus_groups,
                                    prepare_text_encoders, prepare_unet, unet_param_groups)

        cfg, acc, models = self.cfg, self.accelerator, self.models
        self.fsdp = acc.distributed_type == DistributedType.FSDP
        check_parallelism(cfg.training, fsdp_version=acc.state.fsdp_plugin.fsdp_version if self.fsdp else None,
                          num_processes=acc.num_processes, renders=bool(cfg.sample.prompts) or cfg.validation.split > 0)
        prepare_unet(models.unet, cfg.training, cfg.lora, device=None if self.fsdp else acc.device)
        groups = unet_param_groups(models.unet, cfg.training.learning_rate, cfg.training.block_lr_scale)
        te_params = []
        if cfg.training.train_text_encoder:
            te_params = prepare_text_encoders(models.text_encoders, cfg.training, cfg.lora)
            groups.append({"params": te_params, "lr": cfg.training.text_encoder_lr or cfg.training.learning_rate})
        if cfg.lora.plus_ratio and cfg.training.method == "lora":
            groups = lora_plus_groups(groups, [models.unet, *models.text_encoders], cfg.lora.plus_ratio)
        if not self.fsdp:
            # On the device before the optimizer: AdamW picks its fused CUDA kernel there, and the fused
            # backward's fp32 stand-ins sit beside their weights. (FSDP places the shards itself.)
            models.unet.to(acc.device)
        optimizer = build_training_optimizer(groups, cfg.training, cfg.optimizer)  # exactly the trained parameters
        self.fused = optimizer if cfg.training.fused_backward else None  # it steps inside backward
        # We step the LR scheduler once per optimizer step ourselves; `prepare` would step it once
        # per process. Registered, it is still saved and restored with the Accelerate state.
        self.lr_scheduler = build_lr_scheduler(optimizer, cfg.optimizer, cfg.training.max_steps)
        unet = models.unet
        if cfg.training.compile and acc.device.type == "cuda":
            unet = compile_unet(unet, cfg.cache_dir / "compile", cfg.training.compile_mode)
        elif cfg.training.compile:
            acc.print("training.compile is CUDA-only: running eagerly on the CPU")
        self.unet, self.optimizer = acc.prepare(unet, optimizer)
        # FSDP swaps each UNet parameter for its shard: clipping and EMA must see what the optimizer steps.
        self.params = [p for p in self.unet.parameters() if p.requires_grad] + te_params
        # Built once (it indexes every weight's storage) and re-entered by each forward.
        self.activations = saved_activations(cfg.training.gradient_checkpointing,
                                             cfg.training.gradient_checkpointing_mode, acc.device, self.unet)
        # Every trained model: `accumulate` must skip DDP's gradient sync on each of them.
        self.trained_models = [self.unet]
        if cfg.training.train_text_encoder:
            models.text_encoder, models.text_encoder_2 = acc.prepare(models.text_encoder, models.text_encoder_2)
            self.trained_models += [models.text_encoder, models.text_encoder_2]
        acc.register_for_checkpointing(self.lr_scheduler)
        self.ema = None
        if cfg.training.ema_decay:
            from diffusers.training_utils import EMAModel

            # The EMA copy lives beside the trained weights and is saved/restored with them.
            self.ema = EMAModel(self.params, decay=cfg.training.ema_decay)
            acc.register_for_checkpointing(self.ema)
        if not self.fsdp:  # FSDP saves its shards itself; a full fine-tune trains every weight anyway
            ckpt.register_trainable_only_hooks(acc)
        self.norm_bounded = []  # lora.max_norm: the LoRA layers it bounds, found once rather than every step
        if cfg.lora.max_norm and cfg.training.method == "lora":
            from finetune.adapters.save import lora_layers

            bounded = [self.bare_unet(), *(models.text_encoders if cfg.training.train_text_encoder else ())]
            self.norm_bounded = [layer for model in bounded for _, layer in lora_layers(model)]

    def _setup_data(self, latents, text) -> None:
        """Train/validation split, datasets, the bucket loader, and the resume state."""
        from finetune.train.batches import TrainDataset, build_dataloader
        from finetune.dataset import dataset_hash
        from finetune.train.validation import split_rows

        cfg, acc = self.cfg, self.accelerator
        # Held-out rows (validation.split) get their own dataset; the sampler never sees them.
        full = self.manifest
        train_rows, val_rows = split_rows(list(full["fingerprint"]), cfg.validation.split, cfg.training.seed)
        self.manifest = full.select(train_rows) if val_rows else full

        def dataset_for(rows):
            return TrainDataset(full.select(rows), cfg.dataset, seed=cfg.training.seed,
                                prior_loss_weight=cfg.loss.prior_loss_weight, masked=cfg.loss.masked,
                                latents=latents.subset(rows) if latents else None, text=text)

        self.dataset = dataset_for(train_rows)
        self.val_dataset = dataset_for(val_rows) if val_rows else None
        self.loader, self.sampler = build_dataloader(
            self.dataset, self.manifest, cfg.dataset, batch_size=cfg.training.batch_size,
            seed=cfg.training.seed, num_replicas=acc.num_processes, rank=acc.process_index)
        self.state = ckpt.TrainState(seed=cfg.training.seed, num_processes=acc.num_processes,
                                     dataset_hash=dataset_hash(self.manifest))

    def _set_length(self) -> TrainConfig:
        """training.max_epochs, when set, becomes max_steps: the loop and the LR schedule count steps."""
        training = self.cfg.training
        if training.max_epochs is None:
            return self.cfg
        batches, accumulation = len(self.loader), training.gradient_accumulation_steps
        steps = max(1, math.ceil(training.max_epochs * batches / accumulation))
        self.cfg = self.cfg.model_copy(deep=True)
        self.cfg.training.max_steps = steps
        self.accelerator.print(f"training.max_epochs = {training.max_epochs}: {steps} optimizer steps "
                               f"({batches} batches per epoch per process, accumulation {accumulation}); "
                               "it replaces training.max_steps")
        return self.cfg

    # --- resume ----------------------------------------------------------------------------------

    def resume(self, resume: str) -> Path | None:
        """Load a checkpoint's state; with --resume and no checkpoint yet, start from the beginning."""
        from finetune.train.checkpoint import check_resumable, find_resume_folder

        folder = find_resume_folder(self.cfg.output.checkpoints_dir, resume)
        if folder is None:
            self.accelerator.print(f"--resume: no complete checkpoint in {self.cfg.output.checkpoints_dir}; starting from step 0")
            return None
        check_resumable(folder, self.cfg, self.state)
        self.accelerator.load_state(str(folder))
        saved = ckpt.TrainState.from_file(folder / ckpt.STATE_FILE)
        self.state.step, self.state.epoch, self.state.batch_in_epoch = saved.step, saved.epoch, saved.batch_in_epoch
        self.state.images_seen, self.state.nan_steps_skipped = saved.images_seen, saved.nan_steps_skipped
        self.last_checkpoint = folder
        self.epochs_done = self.epochs_completed()
        self.accelerator.print(f"resumed from {folder} (step {saved.step}, epoch {saved.epoch})")
        return folder

    # --- the step --------------------------------------------------------------------------------

    def start_epoch(self) -> None:
        self.dataset.set_epoch(self.state.epoch)
        self.sampler.set_epoch(self.state.epoch)
        self.sampler.load_state_dict({"epoch": self.state.epoch, "batch_index": self.state.batch_in_epoch})

    def micro_step(self, batch: dict) -> float | None:
        """Forward, backward and (on the last micro-batch) the optimizer step. None if the loss was not finite."""
        from finetune.train.step import batch_latents, batch_text, diffusion_step_loss
        from finetune.rng import step_generator

        acc, cfg = self.accelerator, self.cfg
        # Keyed by the micro-batch's place in the data order, which a resume restores exactly.
        generator = step_generator(cfg.training.seed, self.state.epoch, self.state.batch_in_epoch,
                                   acc.process_index, acc.device)
        latents = batch_latents(_to(batch, acc.device), self.models.vae, generator)  # (B, 4, H/8, W/8)
        prompt_embeds, pooled = batch_text(batch, self.text_encode)
        with acc.autocast(), self.activations:
            loss = diffusion_step_loss(
                # Cached embeddings are stored fp16; compute starts in fp32 and autocast takes it from there.
                self.unet, self.noise_scheduler, latents, prompt_embeds.to(acc.device, torch.float32),
                pooled.to(acc.device, torch.float32),
                batch["add_time_ids"].to(acc.device), batch["loss_weight"], cfg.loss, self.prediction_type, generator,
                mask=batch["mask"].to(acc.device) if "mask" in batch else None)
        # Every process must agree to skip, or DDP's gradient sync would wait forever.
        finite = bool(acc.gather(torch.isfinite(loss.detach()).float().reshape(1)).min() > 0)
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        acc.backward(loss)  # with training.fused_backward this also steps the optimizer, tensor by tensor
        if not self._gradients_finite():
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        if acc.sync_gradients:
            if self.norm_bounded:
                from finetune.adapters.norms import clamp_lora_norms

                # The same on every process: the weights it reads are the synced, stepped ones.
                self.norms_scaled, self.largest_norm = clamp_lora_norms(self.norm_bounded, cfg.lora.max_norm)
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.step(self.params)
        self.optimizer.zero_grad(set_to_none=True)
        self.state.images_seen += len(batch["add_time_ids"]) * acc.num_processes
        return loss.detach().item()  # a host sync, once per micro-step: the progress bar needs it

    def _gradients_finite(self) -> bool:
        """Clip (on the last micro-batch) and say whether the gradients are finite, so NaN never reaches the weights.

        fp16's loss scaler skips overflowing steps itself and lowers its scale: those are not failures.
        """
        acc, max_norm = self.accelerator, self.cfg.training.max_grad_norm
        if self.fused is not None:
            self.grad_norm = self.fused.pop_grad_norm()  # clipped per tensor inside backward
            return not self.fused.pop_nonfinite()
        if not acc.sync_gradients or max_norm <= 0:
            return True
        self.grad_norm = acc.clip_grad_norm_(self.params, max_norm)  # the synced gradients: every process agrees
        return acc.scaler is not None or bool(torch.isfinite(self.grad_norm))

    def epochs_completed(self) -> int:
        """Whole passes over the data: an epoch's last batch completes it before the loop moves on."""
        return self.state.epoch + (self.state.batch_in_epoch >= len(self.loader))

    def after_step(self, loss: float, bar) -> None:
        """Log, sample and checkpoint on their cadences (every N steps, and every N epochs)."""
        cfg, state = self.cfg, self.state
        before, self.epochs_done = self.epochs_done, self.epochs_completed()

        def epoch_due(every: int | None) -> bool:  # this step completed the Nth epoch since the last output
            return bool(every) and self.epochs_done // every > before // every

        self.losses.append(loss)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.lr_scheduler.get_last_lr()[0]:.2e}")
        if state.step % cfg.logging.every_n_steps == 0 and cfg.logging.report_to != "none":
            self.accelerator.log(self._metrics(loss), step=state.step)
        every = cfg.sample.every_n_steps
        if cfg.sample.prompts and (every and state.step % every == 0 or epoch_due(cfg.sample.every_n_epochs)):
            self.render_samples()
        if self.val_dataset is not None and state.step % cfg.validation.every_n_steps == 0:
            self.log_validation_loss()
        on_cadence = state.step % cfg.checkpoint.every_n_steps == 0 or epoch_due(cfg.checkpoint.every_n_epochs)
        if on_cadence and state.step < cfg.training.max_steps:  # the last step's checkpoint is finish()'s
            self.save_checkpoint()

    def log_validation_loss(self) -> float | None:
        from finetune.train.validation import validation_loss

        acc = self.accelerator
        if not acc.is_main_process:
            return None
        value = validation_loss(self.bare_unet(), self.val_dataset, self.cfg.validation.timesteps,
                                self.noise_scheduler, self.prediction_type, vae=self.models.vae,
                                text_encode=self.text_encode, device=acc.device, seed=self.cfg.training.seed)
        self.val_losses.append((self.state.step, value))
        acc.print(f"step {self.state.step}: validation loss {value:.5f}")
        if self.cfg.logging.report_to != "none":
            acc.log({"val_loss": value}, step=self.state.step)
        return value

    def _metrics(self, loss: float) -> dict:
        metrics = {"loss": loss, "lr": self.lr_scheduler.get_last_lr()[0],
                   "images_per_s": self.state.images_seen / max(time.time() - self.started, 1e-6)}
        if getattr(self, "grad_norm", None) is not None:
            metrics["grad_norm"] = float(self.grad_norm)
        if getattr(self, "largest_norm", None) is not None:  # lora.max_norm: what kohya logs beside the loss
            metrics["keys_scaled"], metrics["max_norm"] = int(self.norms_scaled), float(self.largest_norm)
        if torch.cuda.is_available():
            metrics["memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return metrics

    # --- outputs ---------------------------------------------------------------------------------

    def bare_unet(self):
        """The UNet without DDP's or torch.compile's wrapper: its own names and config, eager forward."""
        return self.accelerator.unwrap_model(self.unet, keep_torch_compile=False)

    def gather_unet_state(self) -> dict | None:
        """FSDP: the whole UNet's weights gathered from the shards (every process must call it)."""
        return self.accelerator.get_state_dict(self.unet) if self.fsdp else None

    def write_weights(self, path: Path, unet_state: dict | None = None) -> Path:
        """The usable file: the LoRA in the configured format, or the full UNet (SGM keys)."""
        from finetune.train.outputs import save_trained_weights

        acc = self.accelerator
        unet = self.bare_unet()
        encoders = None
        if self.cfg.training.train_text_encoder:
            encoders = tuple(acc.unwrap_model(e) for e in self.models.text_encoders)

        def save():
            return save_trained_weights(path, unet, encoders, self.cfg, self.state, self.manifest, self.models.name,
                                        unet_state=unet_state)

        if self.ema is None:
            return save()
        # With EMA the file holds the averaged weights (UNet or adapter); training continues on its own.
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            return save()
        finally:
            self.ema.restore(self.params)

    def save_checkpoint(self, unet_state: dict | None = None) -> Path:
        cfg = self.cfg
        if unet_state is None:
            unet_state = self.gather_unet_state()
        folder = ckpt.save_checkpoint(
            self.accelerator, cfg.output.checkpoints_dir, self.state, dump_config(cfg),
            lambda tmp: self.write_weights(tmp / f"{cfg.output.name}.safetensors", unet_state))
        if self.accelerator.is_main_process:
            ckpt.prune_checkpoints(cfg.output.checkpoints_dir, cfg.checkpoint.keep_last,
                                   keep_weights=cfg.output.adapter_path.name if cfg.checkpoint.keep_weights else None)
        self.last_checkpoint = folder
        return folder

    def render_samples(self) -> list[Path]:
        from finetune.tools.sample import log_sample_grids, render_training_samples

        acc, cfg = self.accelerator, self.cfg
        if not acc.is_main_process:
            return []
        paths = render_training_samples(self.bare_unet(), self.models, cfg, self.state.step, acc.device)
        self.rendered_step = self.state.step
        if cfg.logging.report_to != "none":
            log_sample_grids(acc.get_tracker(cfg.logging.report_to), paths, self.state.step)
        return paths

    def progress_bar(self):
        if not (self.progress and self.accelerator.is_main_process):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.training.max_steps, initial=self.state.step, desc="train", unit="step")

    def finish(self, interrupted: bool, resumed_from: Path | None):
        from finetune.train.recipe import TrainResult

        cfg, acc = self.cfg, self.accelerator
        if not interrupted:
            unet_state = self.gather_unet_state()  # FSDP: one gather for the checkpoint and the final file
            self.save_checkpoint(unet_state)
            if acc.is_main_process:
                self.write_weights(cfg.output.adapter_path, unet_state)
                if cfg.sample.prompts and self.rendered_step != self.state.step:  # else after_step did
                    self.render_samples()
        acc.wait_for_everyone()
        acc.end_training()
        return TrainResult(output_path=cfg.output.adapter_path, step=self.state.step, losses=self.losses,
                           checkpoint=self.last_checkpoint, manifest_dir=cfg.output.manifest_dir,
                           log_dir=cfg.output.dir / "logs", interrupted=interrupted)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
