"""Trace the peak GPU memory and the FLOPs of the toolkit's SDXL training step, on a machine without a GPU.

The UNet is built on the meta device and set up by the trainer's own code (`prepare_unet`, then
`make_toolkit_step` below: `build_training_optimizer`, `saved_activations`, `diffusion_step_loss`).
Its weights then become fake tensors (torch's `FakeTensorMode`: shapes and dtypes, no data) and two
training steps run while the bytes of every live tensor storage are counted. The second step is reported: by then the optimizer state exists, as in a long run.

What is counted is what `torch.cuda.max_memory_allocated` counts, with autocast following CUDA's
rules (group_norm and layer_norm in fp32). It leaves out what only a GPU shows: the CUDA context,
cuBLAS/cuDNN workspaces and the allocator's cached blocks (`peak_reserved_gib` in benchmark.py).
bitsandbytes kernels cannot run on fake tensors: its 8-bit optimizers are traced as AdamW and the
difference in state bytes is subtracted (8-bit state for tensors of 4096 elements or more, as
bitsandbytes keeps it); NF4 bases and activation offload are not traced.

    python scripts/memory_trace.py                        # every profile, SDXL at 1024², batch 1 (~2 min, 2 cores)
    python scripts/memory_trace.py --profile fast --batch-size 4
    python scripts/memory_trace.py --profile low_vram --checkpointing transformer
    python scripts/memory_trace.py --method full          # every profile for full fine-tuning
    python scripts/memory_trace.py --tiny                 # the tiny model (a test checks it against real tensors)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import weakref
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from benchmark import (  # noqa: E402
    PROFILE_ROWS,
    build_unet,
    flop_counter,
    row_settings,
    source_commit,
    synthetic_batch,
    toolkit_settings,
)

GIB = 2**30
BNB_STATES = {"adamw8bit": 2, "paged_adamw8bit": 2, "lion8bit": 1}  # 8-bit state tensors per parameter
BNB_MIN_8BIT_SIZE = 4096  # smaller tensors keep fp32 state
BNB_BLOCK = 256  # one fp32 absmax per block of 8-bit state


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage alive, and their peak, while active.

    Each storage is counted once (views share it) from the op that made it until its last reference
    is gone. Storages made before the mode was entered are counted through `track`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0
        self._alive: dict[int, weakref.ref] = {}

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata  # the storage itself; every Python wrapper of it shares this
        if key in self._alive:
            return
        nbytes = storage.nbytes()

        def freed(_ref, key=key, nbytes=nbytes) -> None:
            self._alive.pop(key, None)
            self.current -= nbytes

        self._alive[key] = weakref.ref(storage, freed)
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out


@contextlib.contextmanager
def cuda_autocast_rules():
    """CPU autocast with CUDA's fp32 rule for group_norm and layer_norm (CPU's runs them in bf16).

    The UNet's norms are where the two differ; their fp32 outputs are activations the GPU keeps.
    """
    library = torch.library.Library("aten", "IMPL")
    below_autocast = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def fp32(t):
        return None if t is None else t.float()

    def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
        with torch._C._ExcludeDispatchKeyGuard(below_autocast):
            return torch.ops.aten.group_norm(fp32(x), num_groups, fp32(weight), fp32(bias), eps, cudnn_enabled)

    def layer_norm(x, shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
        with torch._C._ExcludeDispatchKeyGuard(below_autocast):
            return torch.ops.aten.layer_norm(fp32(x), shape, fp32(weight), fp32(bias), eps, cudnn_enable)

    library.impl("group_norm", group_norm, "AutocastCPU")
    library.impl("layer_norm", layer_norm, "AutocastCPU")
    try:
        yield
    finally:
        library._destroy()  # the CPU's own autocast rules again


def materialize(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Replace every meta parameter and buffer with an empty tensor of the current (fake) mode.

    Returns:
        The trained parameters, in `module.parameters()` order (as `prepare_unet` returned them).
    """
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:  # a new Parameter: a meta one cannot take a fake tensor as its data
                sub._parameters[name] = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype),
                                                           requires_grad=param.requires_grad)
        for name, buffer in sub._buffers.items():
            if buffer is not None:
                sub._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype)
    return [p for p in module.parameters() if p.requires_grad]


def bnb_state_bytes(params, optimizer_name: str) -> int:
    """The bytes of bitsandbytes' optimizer state for `params`: 8-bit with block absmax, fp32 for small tensors."""
    states = BNB_STATES[optimizer_name]
    total = 0
    for p in params:
        n = p.numel()
        total += states * (n + 4 * math.ceil(n / BNB_BLOCK) if n >= BNB_MIN_8BIT_SIZE else 4 * n)
    return total


def storage_bytes(tensors) -> int:
    """The bytes of the distinct storages behind `tensors` (views and shared tensors counted once)."""
    return sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}.values())


def optimizer_state(optimizer) -> list[torch.Tensor]:
    """An optimizer's state tensors (each inner optimizer's, for the fused backward)."""
    inner = getattr(optimizer, "optimizers", (optimizer,))
    return [t for opt in inner for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)]


def make_toolkit_step(unet, params, training, memory, optim, args, device):
    """The step of `Recipe.micro_step` and `Recipe.optimizer_step` without the Accelerator, which fake
    tensors cannot pass through, on a prepared UNet and its trained `params`. (benchmark.py times the
    recipe's own step; the GPU test in tests/scripts/test_memory_trace.py checks this one's peak.)

    Returns:
        (step function, the optimizer it steps)
    """
    from finetune.config import LossConfig
    from finetune.memory.activations import saved_activations
    from finetune.models.configs import sdxl_scheduler_config
    from finetune.rng import step_generator
    from finetune.train.builders import build_training_optimizer, compile_unet
    from finetune.train.loss import make_noise_scheduler
    from finetune.train.step import diffusion_step_loss

    optimizer = build_training_optimizer([{"params": params}], training, memory, optim)
    model = compile_unet(unet, args.compile_cache, memory.compile_mode) if memory.compile else unet
    scheduler = make_noise_scheduler(sdxl_scheduler_config(), zero_terminal_snr=False)
    loss_cfg = LossConfig()
    batch = synthetic_batch(unet, args.batch_size, args.resolution, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    counter = iter(range(10**9))
    activations = saved_activations(memory.gradient_checkpointing, memory.checkpointing_mode, device, unet)

    def step():
        generator = step_generator(0, next(counter), 0, 0, device)
        with autocast, activations:
            loss = diffusion_step_loss(model, scheduler, batch["latents_mean"], batch["prompt_embeds"],
                                       batch["pooled_prompt_embeds"], batch["add_time_ids"], batch["loss_weight"],
                                       loss_cfg, "epsilon", generator)
        loss.backward()  # with fused_backward this is also the optimizer step
        if not memory.fused_backward:
            torch.nn.utils.clip_grad_norm_(params, training.max_grad_norm)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer



def trace_prepared(unet, training, memory, optim, args, fake: bool = True) -> dict:
    """Bytes and FLOPs of the training step of a UNet that `prepare_unet` set up.

    Args:
        fake: the UNet's weights are on the meta device and are traced as fake tensors; else they are
            real CPU tensors and the step really runs (the tests compare the two).

    Returns:
        {"peak", "weights", "state" (bytes), "flops", "params" (the trained parameters traced)}
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext(), cuda_autocast_rules():
        params = materialize(unet) if fake else [p for p in unet.parameters() if p.requires_grad]
        roots = [*unet.parameters(), *unet.buffers()]
        step_args = SimpleNamespace(batch_size=args.batch_size, resolution=args.resolution, compile_cache=None)
        step, optimizer = make_toolkit_step(unet, params, training, memory, optim, step_args, torch.device("cpu"))
        tracker = LiveBytes()
        for tensor in roots:
            tracker.track(tensor)
        with tracker:
            step()  # the first step creates the optimizer state
            tracker.reset_peak()
            step()
        counter = flop_counter()  # a pass of its own: the counter's module hooks keep checkpointed activations alive
        with counter:
            step()
        return {"peak": tracker.peak, "weights": storage_bytes(roots), "state": storage_bytes(optimizer_state(optimizer)),
                "flops": counter.get_total_flops(), "params": params}


def trace_row(profile: str, args) -> dict:
    """The traced peak memory and FLOPs of one profile's step, beside the pre-flight estimate."""
    from finetune.config import LoraConfig
    from finetune.memory.profiles import estimate_run_gib
    from finetune.train.builders import prepare_unet

    training, memory, optim = toolkit_settings(profile, args)
    settings = row_settings(training, memory, optim)
    row = {"profile": profile, **settings, "resolution": args.resolution, "batch_size": args.batch_size}
    if training.method == "lora" and memory.base_dtype == "nf4":
        return {**row, "error": "an nf4 base is not traced: bitsandbytes' 4-bit kernels need real tensors"}
    notes = []
    if memory.compile:
        memory.compile = False  # the same tensors live with or without Inductor's fusions, give or take
        notes.append("traced eagerly")
    if optim.name in BNB_STATES:
        optim = optim.model_copy(update={"name": "adamw"})
        notes.append(f"{settings['optimizer']} traced as AdamW, state bytes corrected")
    meta = torch.device("meta")
    unet = build_unet(args.tiny, meta)
    params = prepare_unet(unet, training, memory, LoraConfig(rank=args.rank, alpha=args.rank, targets="attn"), device=meta)
    estimate = estimate_run_gib(unet, params, training, memory, settings["optimizer"], args.resolution**2)
    traced = trace_prepared(unet, training, memory, optim, args)
    peak, state = traced["peak"], traced["state"]
    if settings["optimizer"] in BNB_STATES:
        corrected = bnb_state_bytes(traced["params"], settings["optimizer"])
        peak, state = peak - (state - corrected), corrected
    row.update(traced_peak_gib=round(peak / GIB, 4), weights_gib=round(traced["weights"] / GIB, 4),
               optimizer_state_gib=round(state / GIB, 4),
               # activations, gradients and the batch: what the step adds to what stays between steps
               step_working_set_gib=round((peak - traced["weights"] - state) / GIB, 4),
               estimate_gib=round(estimate, 4), tflop_per_step=round(traced["flops"] / 1e12, 4))
    if notes:
        row["note"] = "; ".join(notes)
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="all", help="all, full, or one of " + ", ".join(PROFILE_ROWS))
    p.add_argument("--resolution", type=int, default=None, help="square side in pixels (default 1024; --tiny 128)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--method", choices=["lora", "full"], default="lora", help="training.method the profiles are for")
    p.add_argument("--tiny", action="store_true", help="the tiny model instead of SDXL's UNet")
    p.add_argument("--checkpointing", choices=["off", "full", "transformer", "resnet"], default=None,
                   help="override the profiles' gradient checkpointing (memory.checkpointing_mode)")
    p.add_argument("--base-dtype", choices=["fp32", "bf16", "fp8"], default=None,
                   help="override the LoRA profiles' frozen base precision (memory.base_dtype)")
    args = p.parse_args(argv)
    args.resolution = args.resolution or (128 if args.tiny else 1024)
    # What benchmark.toolkit_settings reads and this script does not offer.
    args.compile_mode, args.no_compile, args.channels_last = None, False, False
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    header = {"model": "tiny" if args.tiny else "sdxl-base-1.0 UNet", "torch": torch.__version__,
              "commit": source_commit(), "command": " ".join(["python", *sys.argv]),
              "counts": "live tensor bytes on fake tensors, CUDA autocast rules; no CUDA context or allocator cache"}
    print(json.dumps({"memory_trace": header}), flush=True)
    if args.profile == "all":
        names = [*PROFILE_ROWS, "full"] if args.method == "lora" else list(PROFILE_ROWS)
    else:
        names = [args.profile]
    for name in names:
        print(json.dumps(trace_row(name, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
