"""The training recipe for SDXL, read top to bottom: setup -> loop -> finish, LoRA or full, resumable.

`train(cfg)` is the whole run. `Recipe.setup` builds each part in the order the next one needs it;
`Recipe.train_loop` runs optimizer steps, each one `gradient_accumulation_steps` micro-steps under
`accelerator.accumulate`; `Recipe.finish` writes the last checkpoint and the usable weights. The step's
math lives in small pure functions (`step.py`, `loss.py`); everything a resume needs is `TrainState`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed

from finetune.adapters.norms import clamp_lora_norms
from finetune.cache.prepare import place_models, prepare_caches
from finetune.config import TrainConfig, check_output_dir, dump_config
from finetune.dataset import dataset_hash
from finetune.errors import FinetuneError
from finetune.memory.profiles import out_of_memory_message
from finetune.models.load import check_unet_inputs, load_models, model_kind
from finetune.rng import shared_step_generator
from finetune.train import builders
from finetune.train import checkpoint as ckpt
from finetune.train.batches import TrainDataset
from finetune.train.command import record_run
from finetune.train.distributed import topology_lines
from finetune.train.logs import RunLog, paused, progress_bar, step_metrics
from finetune.train.loss import make_noise_scheduler, resolve_prediction_type, timestep_range
from finetune.train.optim import clip_gradients
from finetune.train.outputs import averaged_weights, save_trained_weights
from finetune.train.plan import print_plan
from finetune.train.refiner import refiner_run_config
from finetune.train.resume import (ResumePoint, check_config, check_process_count, finished, resume_point,
                                   run_manifest, schedule_change)
from finetune.train.samples import log_sample_grids, render_training_samples
from finetune.train.stop import StopFlag
from finetune.train.step import batch_latents, batch_text, diffusion_step_loss, epoch_window
from finetune.train.trouble import nan_stop_message, out_of_memory_message as trouble_oom_message
from finetune.train.validation import validation_loss
from finetune.train.words import cached_text, freeze_after, setup_words, text_encoder_fn


@dataclass
class TrainResult:
    output_path: Path  # the final adapter (LoRA) or UNet (full) .safetensors
    step: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step of this session, this process
    checkpoint: Path | None = None
    interrupted: bool = False
    finished_before: bool = False  # --resume on a run that had already finished: nothing was done


def train(cfg: TrainConfig, resume: str | None = None, progress: bool = True, *,
          step_loss: Callable = diffusion_step_loss, allow_changes: bool = False,
          command: tuple[Path, list[str]] | None = None) -> TrainResult:
    """Run training as `cfg` says; `resume` is None, "latest" or a checkpoint folder.

    Args:
        step_loss: the loss of one micro-batch (`step.diffusion_step_loss`; tests wrap it).
        allow_changes: resume although frozen settings or the data changed (recorded in the run).
        command: (config file, --set overrides) the run was started with, kept in `run.json` so that
            `--resume` continues with the same settings. Nothing is recorded before the setup completes:
            a refused resume leaves the run folder as it was.
    """
    # These checks come before minutes of scanning and caching; the one resume point is read once.
    check_output_dir(cfg.output, cfg.dataset)  # never among the images; a folder that can be written
    check_unet_inputs(cfg.model)  # an inpainting UNet would fail only at the first step
    point = resume_point(cfg.output.checkpoints_dir, resume) if resume else None
    if point is None:
        ckpt.check_fresh_start(cfg.output.checkpoints_dir)
    elif finished(point, cfg.training, cfg.output.adapter_path):
        return TrainResult(output_path=cfg.output.adapter_path, step=point.state.step, finished_before=True,
                           checkpoint=point.folder)
    recipe = Recipe(cfg, progress=progress, step_loss=step_loss, allow_changes=allow_changes, command=command)
    try:
        recipe.setup(point)
        with StopFlag() as stop:
            interrupted = recipe.train_loop(stop)
        return recipe.finish(interrupted)
    except torch.OutOfMemoryError:
        recipe.fail("out of GPU memory")
        raise FinetuneError(recipe.out_of_memory()) from None
    except BaseException as err:
        recipe.fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise


class Recipe:
    """One run: its parts, built in `setup`, and its progress. Every field is declared here."""

    def __init__(self, cfg: TrainConfig, *, progress: bool = True, step_loss: Callable = diffusion_step_loss,
                 allow_changes: bool = False, command: tuple[Path, list[str]] | None = None):
        self.cfg = cfg  # re-bound in setup once the memory profile and max_epochs have filled it in
        self.progress = progress
        self.step_loss = step_loss
        self.allow_changes = allow_changes
        self.changes: list[str] = []  # the frozen settings --allow-changes accepted on resume
        self.command = command  # (config file, overrides): written to run.json for --resume
        self.phase = "setup"  # setup, caching, training: what an out-of-memory message speaks of
        # Built by setup(), in order.
        self.accelerator = None
        self.manifest = None  # the training rows (validation rows held out)
        self.models = None  # SDXLModels: tokenizers, text encoders, VAE, UNet, noise scheduler
        self.text_encode: Callable | None = None  # captions -> (prompt_embeds, pooled) when not cached
        self.words = None  # NewWords: the [[embeddings]] rows (textual inversion, pivotal tuning)
        self.noise_scheduler = None
        self.prediction_type = ""
        self.dataset: TrainDataset | None = None
        self.val_dataset: TrainDataset | None = None
        self.loader = self.sampler = None
        self.parts: builders.TrainedParts | None = None  # the prepared UNet, optimizer, LR schedule, params, EMA
        self.log: RunLog | None = None
        # Progress. TrainState is what a checkpoint saves; the rest is this session's.
        self.state = ckpt.TrainState()
        self.losses: list[torch.Tensor] = []  # mean loss of each optimizer step, left on the device
        self.window_losses: list[torch.Tensor] = []  # the micro-batch losses of the current step
        self.nan_in_a_row = 0
        self.streak_start = 0  # the step count when the current run of non-finite losses began
        self.window_start: tuple[int, int, int] | None = None  # (epoch, batch_in_epoch, images_seen) of the window
        self.grad_norm: torch.Tensor | None = None
        self.norms_scaled: torch.Tensor | None = None
        self.largest_norm: torch.Tensor | None = None
        self.epochs_done = 0  # whole passes over the data when the last optimizer step ended
        self.rendered_step: int | None = None
        self.last_checkpoint: Path | None = None
        self.started = time.time()

    # --- setup -----------------------------------------------------------------------------------

    def setup(self, point: ResumePoint | None = None) -> Recipe:
        """Build the run; each step needs what the step before it made. `point`: the checkpoint a resume continues."""
        # The profile decides the mixed precision the accelerator is built with.
        self.cfg, profile_message = builders.memory_config(self.cfg, point)
        cfg = self.cfg
        self.accelerator = acc = builders.make_accelerator(cfg.training, cfg.logging, cfg.output.dir)
        set_seed(cfg.training.seed)  # adapter init draws from the global RNG: same seed, same start
        run_line, process_line = topology_lines(acc, cfg.training.mixed_precision)
        acc.print(run_line)
        if process_line:
            print(process_line, flush=True)  # every process: rank, machine, device
        if profile_message:
            acc.print(profile_message)
        # The model's kind from its config or header (no weights yet): a refiner has its own timesteps.
        self.cfg, line = refiner_run_config(self.cfg, model_kind(cfg.model))
        if line:
            acc.print(line)
        if point is not None:  # the settings a resume must keep, before minutes of scanning, loading and caching
            check_process_count(point, acc.num_processes)
            self.changes = check_config(point, self.cfg, self.allow_changes)
        # The main process plans the manifest; on resume it replaces the run's once it matches the checkpoint's data.
        self.manifest, changes = run_manifest(acc, self.cfg, point, self.allow_changes)
        self.changes += changes
        latents, text = self._setup_models()  # caches are built here, so the models can leave the GPU
        self._setup_data(latents, text)  # needs the cache lookups
        # training.max_epochs needs the batch count; the LR schedule needs the length.
        self.cfg = cfg = builders.length_in_steps(self.cfg, len(self.loader), acc.print)
        # Adapters (or full weights), optimizer, LR schedule, EMA, as Accelerate prepared them.
        self.parts = builders.build_trained_parts(
            acc, self.models, cfg.training, cfg.memory, cfg.optimizer, cfg.lora, words=self.words,
            renders=bool(cfg.sample.prompts) or cfg.validation.split > 0, compile_dir=cfg.cache_dir / "compile")
        if point is not None:  # the checkpoint's Accelerate state and TrainState; a new length is said and kept
            longer = schedule_change(point, self.cfg.training, self.cfg.optimizer)
            self.last_checkpoint = ckpt.restore(acc, point.folder, point.state, self.state,
                                                self.changes + ([longer] if longer else []))
            self.epochs_done = self.epochs_completed()
        if acc.is_main_process:  # setup is complete (a resume accepted): the run's record, as it trains
            record_run(self.cfg, *(self.command or (None, [])))
        self.log = RunLog.open(self.cfg, acc, self.state.step)
        print_plan(acc, self.cfg, len(self.loader), len(self.manifest), self.parts.params, self.models.unet,
                   self.sampler, self.manifest)
        return self

    def _setup_models(self):
        """Load SDXL, build the caches, and keep on the GPU only what training still needs."""
        cfg, acc = self.cfg, self.accelerator
        self.models = models = load_models(cfg.model, dtype=torch.float32)
        # Before the caches are built (minutes), not at the first step.
        timestep_range(models.noise_scheduler.config.num_train_timesteps, cfg.loss.min_timestep, cfg.loss.max_timestep)
        self.phase = "caching"
        latents, text, _ = prepare_caches(self.manifest, models, acc, cfg.cache, cfg.cache_dir, cfg.dataset,
                                          cfg.embeddings, progress=self.progress)
        self.phase = "setup"
        # With both caches, only the UNet trains on the GPU (new words keep the text encoders there:
        # their captions are encoded every step).
        place_models(models, acc.device, vae=latents is None, text_encoders=text is None or bool(cfg.embeddings))
        self.words = setup_words(models, cfg, acc, self.manifest["caption"])  # after the text cache
        self.text_encode = text_encoder_fn(models, cfg.dataset.long_captions, self.words, cfg.dataset.weighted_captions)
        self.noise_scheduler = make_noise_scheduler(dict(models.noise_scheduler.config), cfg.loss.zero_terminal_snr)
        self.prediction_type = resolve_prediction_type(cfg.loss.prediction_type, self.noise_scheduler)
        return latents, cached_text(text, cfg.embeddings)

    def _setup_data(self, latents, text) -> None:
        """Train/validation split, datasets, the bucket loader, and the resume state."""
        cfg, acc = self.cfg, self.accelerator
        data = builders.build_data(self.manifest, latents, text, cfg.dataset, cfg.training, cfg.loss, cfg.validation,
                                   acc.num_processes, acc.process_index, kind=self.models.kind)
        self.manifest, self.dataset, self.val_dataset, self.loader, self.sampler = data
        self.state = ckpt.TrainState(seed=cfg.training.seed, num_processes=acc.num_processes,
                                     dataset_hash=dataset_hash(self.manifest))

    # --- the loop --------------------------------------------------------------------------------

    def train_loop(self, stop: StopFlag) -> bool:
        """Optimizer steps until max_steps (or a stop request). Returns True if stopped early."""
        cfg, state, acc = self.cfg, self.state, self.accelerator
        self.phase = "training"
        bar = progress_bar(self.cfg.training.max_steps, self.state.step, self.progress and acc.is_main_process)
        while state.step < cfg.training.max_steps:
            self.dataset.set_epoch(state.epoch)  # the caption shuffles and the bucket order of this epoch
            self.sampler.set_epoch(state.epoch)
            self.sampler.load_state_dict({"epoch": state.epoch, "batch_index": state.batch_in_epoch})
            for batch in self.loader:
                if not self.window_losses:  # a new accumulation window: where an out-of-memory save goes back to
                    self.window_start = (state.epoch, state.batch_in_epoch, state.images_seen)
                state.batch_in_epoch += 1
                scale = epoch_window(acc, state.batch_in_epoch, len(self.loader))  # before accumulate decides the sync
                with acc.accumulate(*self.parts.trained_models):
                    self.micro_step(batch, scale)
                    stepped = self.optimizer_step() if acc.sync_gradients else None
                if stepped is None:  # inside an accumulation window
                    continue
                self.window_start = None  # the window is done (stepped or skipped): nothing to go back to
                if stepped:
                    state.step += 1
                    self.after_step(bar)
                if state.step >= cfg.training.max_steps or stop.requested:
                    break
            else:
                state.epoch += 1
                state.batch_in_epoch = 0
            if stop.requested:
                self.save_checkpoint()
                return True
        return False

    def micro_step(self, batch: dict, scale: float = 1.0) -> None:
        """Forward and backward of one micro-batch (`scale`: its loss's, see `epoch_window`); no host sync here."""
        acc = self.accelerator
        # Keyed by the micro-batch's place in the data order, which a resume restores exactly.
        # Drawn for all processes' rows of the step, so the process count does not change the noise.
        generator = shared_step_generator(self.cfg.training.seed, self.state.epoch, self.state.batch_in_epoch,
                                          self.sampler.rows_in_step(self.state.batch_in_epoch - 1), acc.device)
        batch = {k: v.to(acc.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        freeze_after(self.words, self.state.step, self.cfg.training.embedding_stop)
        latents = batch_latents(batch, self.models.vae, generator)  # (B, 4, H/8, W/8)
        prompt_embeds, pooled = batch_text(batch, self.text_encode)
        with acc.autocast(), self.parts.activations:
            loss = self.step_loss(
                # Cached embeddings are stored fp16; compute starts in fp32 and autocast takes it from there.
                self.parts.unet, self.noise_scheduler, latents, prompt_embeds.to(acc.device, torch.float32),
                pooled.to(acc.device, torch.float32), batch["add_time_ids"], batch["loss_weight"], self.cfg.loss,
                self.prediction_type, generator, mask=batch.get("mask"))
        self.window_losses.append(loss.detach())
        if self.parts.fused is not None and not self._losses_finite():
            return  # the fused backward would apply NaN updates as it goes: skip it (one micro-step per step)
        if loss.requires_grad:  # embeddings only: a batch without a new word has nothing to train
            acc.backward(loss * scale)  # with memory.fused_backward this also steps the optimizer, tensor by tensor
        self.state.images_seen += len(batch["add_time_ids"]) * acc.num_processes

    def optimizer_step(self) -> bool:
        """At the end of an accumulation window: step if the window's losses and gradients are finite.

        The NaN policy lives here: a non-finite loss in any micro-batch of the window, or non-finite
        gradients, skip the whole step (the gradients are dropped, the weights untouched) and count
        toward training.max_nan_steps. Every process reaches the same decision.
        """
        parts = self.parts
        finite = self._losses_finite()
        if finite:
            self.grad_norm, finite = clip_gradients(self.accelerator, parts.params, self.cfg.training.max_grad_norm,
                                                    parts.fused)
        if finite:
            parts.optimizer.step()
            if parts.norm_bounded:  # the same on every process: it reads the synced, stepped weights
                self.norms_scaled, self.largest_norm = clamp_lora_norms(parts.norm_bounded, self.cfg.lora.max_norm)
            parts.lr_scheduler.step()
            if parts.ema is not None:
                parts.ema.step(parts.params)
        parts.optimizer.zero_grad(set_to_none=True)
        window, self.window_losses = self.window_losses, []
        if finite:
            self.nan_in_a_row = 0
            self.losses.append(torch.stack(window).mean())
            return True
        if self.nan_in_a_row == 0:
            self.streak_start = self.state.step
        self.nan_in_a_row += 1
        self.state.nan_steps_skipped += 1
        self.accelerator.print(f"\nstep {self.state.step + 1}: loss or gradients NaN/inf, step skipped ({self.nan_in_a_row} "
                               f"in a row, {self.state.nan_steps_skipped} in the run; training.max_nan_steps = "
                               f"{self.cfg.training.max_nan_steps})")
        if self.nan_in_a_row >= self.cfg.training.max_nan_steps:
            raise FinetuneError(nan_stop_message(
                streak=self.nan_in_a_row, step=self.state.step, streak_start=self.streak_start,
                run_dir=self.cfg.output.dir, learning_rate=self.cfg.training.learning_rate,
                mixed_precision=self.cfg.training.mixed_precision))
        return False

    def _losses_finite(self) -> bool:
        # One host sync per optimizer step; gathered so that DDP processes skip together.
        finite = torch.isfinite(torch.stack(self.window_losses)).all().float().reshape(1)
        return bool(self.accelerator.gather(finite).min() > 0)

    def epochs_completed(self) -> int:
        """Whole passes over the data: an epoch's last batch completes it before the loop moves on."""
        return self.state.epoch + (self.state.batch_in_epoch >= len(self.loader))

    def after_step(self, bar) -> None:
        """Log, sample, validate and checkpoint on their cadences (every N steps, and every N epochs)."""
        cfg, state, acc = self.cfg, self.state, self.accelerator
        before, self.epochs_done = self.epochs_done, self.epochs_completed()

        def epoch_due(every: int | None) -> bool:  # this step completed the Nth epoch since the last output
            return bool(every) and self.epochs_done // every > before // every

        bar.update(1)
        if state.step == 1 or state.step % cfg.logging.every_n_steps == 0:  # the host sync: only when logging
            metrics = step_metrics(self.losses[-1], self.parts.lr_scheduler.get_last_lr()[0],
                                   state.images_seen / max(time.time() - self.started, 1e-6),
                                   self.grad_norm, self.norms_scaled, self.largest_norm, state.nan_steps_skipped)
            self.log.log(state.step, state.epoch, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                            **({"skipped": state.nan_steps_skipped} if state.nan_steps_skipped else {}))
        on_cadence = state.step % cfg.checkpoint.every_n_steps == 0 or epoch_due(cfg.checkpoint.every_n_epochs)
        if on_cadence and state.step < cfg.training.max_steps:  # the last step's checkpoint is finish()'s
            self.save_checkpoint()  # before samples: rendering may run out of memory, the checkpoint is kept
        every = cfg.sample.every_n_steps
        if cfg.sample.prompts and (every and state.step % every == 0 or epoch_due(cfg.sample.every_n_epochs)):
            with paused(bar):  # the ETA counts training steps, not the minutes spent rendering
                self.render_samples()
        if self.val_dataset is not None and state.step % cfg.validation.every_n_steps == 0 and acc.is_main_process:
            value = validation_loss(self.bare_unet(), self.val_dataset, cfg.validation.timesteps, self.noise_scheduler,
                                    self.prediction_type, vae=self.models.vae, text_encode=self.text_encode,
                                    device=acc.device, seed=cfg.training.seed)
            acc.print(f"step {state.step}: validation loss {value:.5f}")
            self.log.log(state.step, state.epoch, {"val_loss": value})

    # --- outputs ---------------------------------------------------------------------------------

    def bare_unet(self):
        """The UNet without DDP's or torch.compile's wrapper: its own names and config, eager forward."""
        return self.accelerator.unwrap_model(self.parts.unet, keep_torch_compile=False)

    def write_weights(self, path: Path, unet_state: dict | None = None) -> Path:
        """The usable file: the LoRA in its format, or the full UNet (SGM keys); with EMA, the averaged
        weights (training goes on with its own). `unet_state`: the UNet gathered from FSDP shards."""
        trained_encoders = self.cfg.training.train_text_encoder
        encoders = tuple(map(self.accelerator.unwrap_model, self.models.text_encoders)) if trained_encoders else None
        with averaged_weights(self.parts.ema, self.parts.params):
            return save_trained_weights(path, self.bare_unet(), encoders, self.cfg, self.state, self.manifest,
                                        self.models.name, unet_state=unet_state, words=self.words)

    def save_checkpoint(self, unet_state: dict | None = None) -> Path:
        cfg, acc = self.cfg, self.accelerator
        if unet_state is None and self.parts.fsdp:
            unet_state = acc.get_state_dict(self.parts.unet)  # every process must join the gather
        folder = ckpt.save_checkpoint(
            acc, cfg.output.checkpoints_dir, self.state, dump_config(cfg),
            lambda tmp: self.write_weights(tmp / f"{cfg.output.name}.safetensors", unet_state))
        if acc.is_main_process:
            ckpt.prune_checkpoints(cfg.output.checkpoints_dir, cfg.checkpoint.keep_last,
                                   keep_weights=cfg.output.adapter_path.name if cfg.checkpoint.keep_weights else None)
        self.last_checkpoint = folder
        return folder

    def render_samples(self) -> None:
        """The sample grid at this step (the main process renders it), sent to the tracker if any."""
        acc, cfg = self.accelerator, self.cfg
        if acc.is_main_process:
            paths = render_training_samples(self.bare_unet(), self.models, cfg.sample, cfg.output, cfg.dataset.resolution,
                                            self.state.step, acc.device, progress=self.progress, words=self.words)
            if cfg.logging.report_to != "none":
                log_sample_grids(acc.get_tracker(cfg.logging.report_to), paths, self.state.step)
        self.rendered_step = self.state.step

    def finish(self, interrupted: bool) -> TrainResult:
        cfg, acc = self.cfg, self.accelerator
        if not interrupted:
            unet_state = acc.get_state_dict(self.parts.unet) if self.parts.fsdp else None  # one gather for both files
            self.save_checkpoint(unet_state)
            if acc.is_main_process:
                self.write_weights(cfg.output.adapter_path, unet_state)
                if cfg.sample.prompts and self.rendered_step != self.state.step:  # else after_step did
                    self.render_samples()
        acc.wait_for_everyone()
        acc.end_training()
        self.log.status("stopped" if interrupted else "finished", self.state.step)
        losses = torch.stack(self.losses).tolist() if self.losses else []
        return TrainResult(output_path=cfg.output.adapter_path, step=self.state.step, losses=losses,
                           checkpoint=self.last_checkpoint, interrupted=interrupted)

    def out_of_memory(self) -> str:
        """Out of memory inside a step: save the last completed optimizer step when that is safe (one
        process, no optimizer stepping inside backward), and say how to continue with less memory."""
        if self.phase != "training":
            return out_of_memory_message(self.phase)
        folder = self.last_checkpoint
        if self.parts is not None and self.parts.fused is None and self.accelerator.num_processes == 1:
            self.parts.optimizer.zero_grad(set_to_none=True)  # the unfinished window's gradients
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if self.window_start is not None:  # back to the start of the window the step never finished
                self.state.epoch, self.state.batch_in_epoch, self.state.images_seen = self.window_start
            with contextlib.suppress(torch.OutOfMemoryError, FinetuneError):
                folder = self.save_checkpoint()
        return trouble_oom_message(run_dir=self.cfg.output.dir, resume_from=folder, memory=self.cfg.memory,
                                   training=self.cfg.training)

    def fail(self, error: str) -> None:
        """Record a failure in status.json, when the run got far enough to have one."""
        if self.log is not None:
            with contextlib.suppress(OSError):
                self.log.status("failed", self.state.step, error)

