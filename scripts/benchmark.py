"""Benchmark the toolkit's own SDXL training step per memory profile against a diffusers-style baseline.

Builds the UNet from the bundled SDXL config (or the tiny model with --tiny) with random weights,
directly on the device, and times the trainer's own step: a `Recipe` whose parts `build_trained_parts`
made runs `Recipe.micro_step` and `Recipe.optimizer_step` (NaN checks, clipping, LR schedule
included) on synthetic cached latents and embeddings. Prints one JSON line per row, then the
data-side rows (bucket planning and cache build throughput).

    python scripts/benchmark.py                      # all rows, 1024², batch 1 (GPU)
    python scripts/benchmark.py --profile fast --batch-size 4
    python scripts/benchmark.py --vram-gib 12        # behave like a 12 GiB card
    python scripts/benchmark.py --tiny               # CPU, tiny model, under a minute
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# bf16 dense matrix peak, for MFU. Unknown devices report mfu = null rather than a guess.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}

PROFILE_ROWS = ("fast", "balanced", "low_vram", "min_vram")


def build_unet(tiny: bool, device: torch.device):
    from diffusers import UNet2DConditionModel

    from finetune.models.configs import sdxl_unet_config
    from finetune.models.tiny import tiny_unet_config

    config = tiny_unet_config() if tiny else {k: v for k, v in sdxl_unet_config().items() if not k.startswith("_")}
    torch.manual_seed(0)
    # Random init directly on the device and in bf16 (5 GB for SDXL, not 10): it fits under an
    # 8 GiB --vram-gib cap, and every row runs its base in bf16 or less anyway.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return UNet2DConditionModel(**config)
    finally:
        torch.set_default_dtype(default)


def synthetic_batch(unet, batch_size: int, resolution: int, device: torch.device) -> dict:
    """What the data loader hands the trainer from the caches: latents, both text embeddings, micro-conditioning."""
    g = torch.Generator(device="cpu").manual_seed(0)
    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    side = resolution // 8
    return {
        "latents_mean": torch.randn(batch_size, 4, side, side, generator=g).to(device),  # no std: used as is
        "prompt_embeds": torch.randn(batch_size, 77, unet.config.cross_attention_dim, generator=g).to(device),
        "pooled_prompt_embeds": torch.randn(batch_size, pooled_dim, generator=g).to(device),
        "add_time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch_size,
                                     dtype=torch.float32, device=device),
        "loss_weight": torch.ones(batch_size, device=device),
    }


def toolkit_settings(profile: str, args):
    """The TrainingConfig, MemoryConfig and OptimizerConfig that `finetune train` would run for this row."""
    from finetune.config import MemoryConfig, OptimizerConfig, TrainingConfig
    from finetune.memory.profiles import profile_settings

    # The full row: full fine-tuning as low_vram sets it up (fused backward, bf16 weights, 8-bit AdamW).
    # memory_trace.py's --method full prices every profile for full fine-tuning.
    method = "full" if profile == "full" or getattr(args, "method", "lora") == "full" else "lora"
    settings = profile_settings("low_vram" if profile == "full" else profile, method)
    training = {k: v for (t, k), v in settings.items() if t == "training"}
    memory = {k: v for (t, k), v in settings.items() if t == "memory"}
    if args.checkpointing:
        memory.update(gradient_checkpointing=args.checkpointing != "off",
                      checkpointing_mode="full" if args.checkpointing == "off" else args.checkpointing)
    if args.base_dtype and method == "lora":
        memory["base_dtype"] = args.base_dtype
    if args.compile_mode:
        memory.update(compile=True, compile_mode=args.compile_mode)
    if args.no_compile:
        memory["compile"] = False
    memory["channels_last"] = args.channels_last
    training.update(method=method, learning_rate=1e-4, batch_size=args.batch_size)  # the command line's batch wins
    return TrainingConfig(**training), MemoryConfig(**memory), OptimizerConfig(name=settings[("optimizer", "name")])


def toolkit_step(profile: str, unet, args, device):
    """The training step `finetune train` runs, set up as the profile says. Returns (step_fn, note, settings)."""
    from finetune.config import LoraConfig

    training, memory, optim = toolkit_settings(profile, args)
    notes = []
    if device.type != "cuda" and optim.name != "adamw":
        # bitsandbytes' CPU fallback takes seconds per step: a number that says nothing about a GPU.
        notes.append(f"{optim.name} is timed on CUDA only; AdamW here")
        optim.name = "adamw"
    if device.type != "cuda" and memory.compile:
        memory.compile = False
        notes.append("torch.compile skipped on the CPU")
    recipe = toolkit_recipe(unet, training, memory, optim, LoraConfig(rank=args.rank, alpha=args.rank, targets="attn"),
                            Path(args.compile_cache))
    batch = synthetic_batch(unet, args.batch_size, args.resolution, device)
    accelerator = recipe.accelerator

    def step():
        """One optimizer step as `Recipe.train_loop` runs it (accumulation 1: one micro-step per step)."""
        recipe.state.batch_in_epoch += 1
        with accelerator.accumulate(*recipe.parts.trained_models):
            recipe.micro_step(batch)
            recipe.optimizer_step()  # with fused_backward the weights were stepped inside backward

    return step, "; ".join(notes) or None, row_settings(training, memory, optim)


def toolkit_recipe(unet, training, memory, optim, lora, compile_dir: Path):
    """A `Recipe` holding what its step reads, built by the trainer's own builders around `unet`: the
    accelerator, the trained parts (adapters, optimizer, LR schedule, compile, checkpointing hooks), the
    noise scheduler. No data, VAE or text encoders: the batch is what the caches would hand the loader."""
    from finetune.config import LoggingConfig, LossConfig, OutputConfig, TrainConfig
    from finetune.models.configs import sdxl_scheduler_config
    from finetune.train import builders
    from finetune.train.loss import make_noise_scheduler
    from finetune.train.recipe import Recipe

    # Accumulation 1, so that each timed step is one micro-step and one optimizer step.
    training = training.model_copy(update={"allow_cpu": True, "gradient_accumulation_steps": 1, "max_steps": 10**6})
    run_dir = Path(tempfile.gettempdir()) / "finetune-benchmark"
    # model_construct: a synthetic run has no model files or dataset folder for [model] and [dataset] to check.
    cfg = TrainConfig.model_construct(training=training, memory=memory, optimizer=optim, lora=lora, loss=LossConfig(),
                                      output=OutputConfig(dir=run_dir), logging=LoggingConfig())
    recipe = Recipe(cfg, progress=False)
    recipe.accelerator = accelerator = builders.make_accelerator(training, cfg.logging, run_dir)
    recipe.models = SimpleNamespace(unet=unet, vae=None, text_encoders=[])
    recipe.parts = builders.build_trained_parts(accelerator, recipe.models, training, memory, optim, lora,
                                                renders=False, compile_dir=compile_dir)
    recipe.noise_scheduler = make_noise_scheduler(sdxl_scheduler_config(), zero_terminal_snr=False)
    recipe.prediction_type = "epsilon"
    # One process draws every row of the step: the noise generator's (offset, total).
    recipe.sampler = SimpleNamespace(rows_in_step=lambda index: (0, training.batch_size))
    return recipe


def row_settings(training, memory, optim) -> dict:
    """The settings a toolkit row reports."""
    settings = {"method": training.method, "checkpointing": memory.checkpointing_mode
                if memory.gradient_checkpointing else "off", "optimizer": optim.name,
                "fused_backward": memory.fused_backward, "compile": memory.compile and memory.compile_mode,
                "channels_last": memory.channels_last}
    if training.method == "full":
        settings["weight_dtype"] = memory.weight_dtype
    else:
        settings["base_dtype"] = memory.base_dtype
    return settings


def baseline_step(unet, args, device):
    """The step as diffusers' train_dreambooth_lora_sdxl.py sets it up, in a few lines.

    UNet weights in the mixed-precision dtype, peft LoRA on to_q/to_k/to_v/to_out.0 (fp32), bf16
    autocast, SDPA (diffusers' default), AdamW; its optional flags --gradient_checkpointing and
    --use_8bit_adam are --baseline-checkpointing and --baseline-8bit here.
    """
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from finetune.models.configs import sdxl_scheduler_config

    weight_dtype = torch.bfloat16
    unet.requires_grad_(False)
    unet.to(dtype=weight_dtype)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if args.baseline_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.baseline_8bit:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = DDPMScheduler.from_config(sdxl_scheduler_config())
    batch = synthetic_batch(unet, args.batch_size, args.resolution, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step():
        latents = batch["latents_mean"]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with autocast:
            pred = unet(noisy, timesteps, batch["prompt_embeds"], added_cond_kwargs={
                "text_embeds": batch["pooled_prompt_embeds"], "time_ids": batch["add_time_ids"]}).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    settings = {"base_dtype": "bf16", "checkpointing": "full" if args.baseline_checkpointing else "off",
                "optimizer": "adamw8bit" if args.baseline_8bit else "adamw"}
    return step, None, settings


def flop_counter():
    """torch's FlopCounterMode, also counting the CPU flash-attention kernels it has no formula for.

    On CUDA, SDPA runs flash or memory-efficient attention, which the counter knows; on the CPU it runs
    `_scaled_dot_product_flash_attention_for_cpu`, the same FLOPs under another name.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:  # shapes, not tensors
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward})


def measure(step, args, device) -> dict:
    """Median step time after warm-up, peak memory, and FLOPs of one step (forward + backward)."""
    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    row = {"step_ms": round(statistics.median(times), 2)}
    if device.type == "cuda":
        row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    else:
        row["peak_allocated_gib"] = row["peak_reserved_gib"] = None
    counter = flop_counter()
    with counter:
        step()
    flops = counter.get_total_flops()
    row["tflop_per_step"] = round(flops / 1e12, 4)
    row["tflops"] = round(flops / 1e12 / (row["step_ms"] / 1000), 3)
    peak = next((v for k, v in PEAK_TFLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    row["mfu"] = round(row["tflops"] / peak, 4) if peak else None
    if args.trace:
        row["trace"] = trace_summary(step, device)
    return row


def trace_summary(step, device, steps: int = 2, top: int = 8) -> dict:
    """Where a step's time goes (torch.profiler): device-busy share of the wall time and the top ops.

    A device busy for much less than the wall time means the host (kernel launches, Python,
    syncs) is the blocker; otherwise the top ops name the kernels to work on.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    wall_us = (time.perf_counter() - start) * 1e6 / steps
    events = prof.key_averages()
    on_device = device.type == "cuda"

    def self_us(e):
        return e.self_device_time_total if on_device else e.self_cpu_time_total

    ranked = sorted(events, key=self_us, reverse=True)[:top]
    busy_us = sum(self_us(e) for e in events) / steps
    return {"device_busy_share": round(min(busy_us / wall_us, 1.0), 3) if on_device else None,
            "top_ops_ms_per_step": {e.key: round(self_us(e) / steps / 1000, 3) for e in ranked}}


def run_row(name: str, args, device) -> dict:
    note = None
    try:
        unet = build_unet(args.tiny, device)
        step, note, settings = (baseline_step(unet, args, device) if name == "baseline"
                                else toolkit_step(name, unet, args, device))
        row = {"profile": name, **settings, **measure(step, args, device)}
    except torch.OutOfMemoryError:  # a row that does not fit the (capped) card is a result too
        row = {"profile": name, "error": "out of memory", "vram_gib": args.vram_gib}
    finally:
        unet = step = None  # release the model before the next row builds its own
        gc.collect()  # the row's Recipe and Accelerator may sit in reference cycles: free them now
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if note:
        row["note"] = note
    return row


def source_commit() -> str | None:
    """The checkout's commit, "-dirty" when files differ from it: every figure names the code it measured."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None  # not a git checkout (or no git): the row still stands, unattributed
    return commit.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="all", help="all, baseline, full, or one of " + ", ".join(PROFILE_ROWS))
    p.add_argument("--resolution", type=int, default=None, help="square side in pixels (default 1024; --tiny 256)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 20; --tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; --tiny 1)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--vram-gib", type=float, default=None, help="cap this process's GPU memory, like a smaller card")
    p.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (a test runs this)")
    p.add_argument("--checkpointing", choices=["off", "full", "transformer", "resnet", "offload"], default=None,
                   help="override the profiles' gradient checkpointing (memory.checkpointing_mode)")
    p.add_argument("--base-dtype", choices=["fp32", "bf16", "fp8", "nf4"], default=None,
                   help="override the LoRA profiles' frozen base precision (memory.base_dtype)")
    p.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"], default=None,
                   help="compile every toolkit row with this torch.compile mode (reduce-overhead: CUDA graphs)")
    p.add_argument("--trace", action="store_true", help="add a torch.profiler summary to each row (top ops, device busy share)")
    p.add_argument("--no-compile", action="store_true", help="run every row eagerly (compiling SDXL takes minutes)")
    p.add_argument("--channels-last", action="store_true", help="UNet convs in channels-last layout (toolkit rows)")
    p.add_argument("--compile-cache", default=str(Path.home() / ".cache" / "sdxl-finetune" / "compile"),
                   help="Inductor cache folder for compiled rows (reused between runs)")
    p.add_argument("--baseline-checkpointing", action="store_true")
    p.add_argument("--baseline-8bit", action="store_true")
    p.add_argument("--planning-images", type=int, default=None, help="synthetic images for the planning row (default 20000; --tiny 2000)")
    p.add_argument("--cache-images", type=int, default=None, help="images for the cache row (default 64; --tiny 16)")
    p.add_argument("--no-data", action="store_true", help="skip the planning and cache rows")
    args = p.parse_args(argv)
    args.resolution = args.resolution or (128 if args.tiny else 1024)
    args.steps = args.steps or (2 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.cache_images = args.cache_images or (16 if args.tiny else 64)
    args.planning_images = args.planning_images or (2000 if args.tiny else 20000)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if args.vram_gib:
            total = torch.cuda.get_device_properties(0).total_memory / 2**30
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.vram_gib / total))
    header = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "commit": source_commit(), "command": " ".join(["python", *sys.argv]),
              "resolution": args.resolution, "batch_size": args.batch_size, "rank": args.rank,
              "model": "tiny" if args.tiny else "sdxl-base-1.0 (random weights)", "vram_gib": args.vram_gib}
    print(json.dumps({"benchmark": header}), flush=True)
    names = ["baseline", *PROFILE_ROWS, "full"] if args.profile == "all" else [args.profile]
    baseline_ms = None
    for name in names:
        row = run_row(name, args, device)
        if name == "baseline":
            baseline_ms = row.get("step_ms")
        row["ratio_vs_baseline"] = round(row["step_ms"] / baseline_ms, 3) if baseline_ms and "step_ms" in row else None
        print(json.dumps(row), flush=True)
    if not args.no_data:
        from benchmark_data import data_rows  # beside this script

        for row in data_rows(args.planning_images, args.cache_images, device):
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
