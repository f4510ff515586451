"""Optimizers and learning-rate schedules, built by name from the `[optimizer]` table."""

from __future__ import annotations

import importlib
import logging
import warnings
from types import ModuleType

import torch
from torch.optim.lr_scheduler import LRScheduler

from finetune.config import OptimizerConfig
from finetune.errors import ConfigError

# diffusers is imported where the LR schedule is built: importing it takes seconds.

def _require(module: str, optimizer_name: str, package: str) -> ModuleType:
    """Import an optional package, or say which one to install for this optimizer."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f'optimizer.name = "{optimizer_name}" needs {package}: pip install {package}'
        ) from None


def _bitsandbytes(optimizer_name: str) -> ModuleType:
    # Its "Failed to load CPU gemm_4bit_forward" notice (CPUs with AVX512-BF16) is not for users.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    return _require("bitsandbytes.optim", optimizer_name, "bitsandbytes")


def _with_lr(param_groups: list[dict], learning_rate: float) -> list[dict]:
    """Copies of the groups, each with an "lr" (its own, else `learning_rate`)."""
    return [{**group, "lr": learning_rate if group.get("lr") is None else group["lr"]} for group in param_groups]


def _adamw(groups: list[dict], cfg: OptimizerConfig, learning_rate: float) -> torch.optim.Optimizer:
    params = [p for group in groups for p in group["params"]]
    # The fused kernel updates every parameter in one launch; we use it on CUDA only.
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=cfg.betas, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused or None)


def _bnb(groups: list[dict], cfg: OptimizerConfig, learning_rate: float) -> torch.optim.Optimizer:
    bnb = _bitsandbytes(cfg.name)
    # Parameters under min_8bit_size (4096) elements keep 32-bit state: only large tensors shrink.
    if cfg.name == "lion8bit":
        return bnb.Lion8bit(groups, lr=learning_rate, betas=cfg.betas, weight_decay=cfg.weight_decay)
    # On CPU the paged variant warns and keeps ordinary memory.
    cls = bnb.PagedAdamW8bit if cfg.name == "paged_adamw8bit" else bnb.AdamW8bit
    return cls(groups, lr=learning_rate, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def _adafactor(groups: list[dict], cfg: OptimizerConfig, learning_rate: float) -> torch.optim.Optimizer:
    Adafactor = _require("transformers.optimization", cfg.name, "transformers").Adafactor
    if cfg.relative_step:
        # Adafactor computes its own step size (with its own warmup); an explicit lr would contradict
        # it and transformers refuses the pair, so every group's lr is dropped.
        groups = [{k: v for k, v in group.items() if k != "lr"} for group in groups]
        return Adafactor(groups, lr=None, relative_step=True, scale_parameter=True, warmup_init=True,
                         weight_decay=cfg.weight_decay)
    # A fixed LR: no parameter-scale step and no internal warmup (warmup_init needs relative_step).
    return Adafactor(groups, lr=learning_rate, relative_step=False, scale_parameter=False, warmup_init=False,
                     weight_decay=cfg.weight_decay)


def _prodigy(groups: list[dict], cfg: OptimizerConfig, learning_rate: float) -> torch.optim.Optimizer:
    prodigyopt = _require("prodigyopt", cfg.name, "prodigyopt")
    if not 0.1 <= learning_rate <= 10:
        warnings.warn(
            f"optimizer.name = \"prodigy\" estimates the step size itself; its learning_rate is a multiplier "
            f"whose convention is 1.0, got training.learning_rate = {learning_rate}", stacklevel=3)
    # With an LR warmup Prodigy's authors ask for safeguard_warmup, else the D estimate overshoots.
    return prodigyopt.Prodigy(groups, lr=learning_rate, betas=cfg.betas, eps=cfg.eps,
                              weight_decay=cfg.weight_decay, safeguard_warmup=cfg.warmup_steps > 0)


_BUILDERS = {
    "adamw": _adamw,
    "adamw8bit": _bnb,
    "paged_adamw8bit": _bnb,
    "lion8bit": _bnb,
    "adafactor": _adafactor,
    "prodigy": _prodigy,
}


def build_optimizer(param_groups: list[dict], cfg: OptimizerConfig, learning_rate: float) -> torch.optim.Optimizer:
    """The optimizer `cfg.name` names, over `param_groups`.

    Args:
        param_groups: torch param groups ({"params": [...], optional "lr": ...}); a group without
            "lr" gets `learning_rate` (UNet and text encoders may differ).
        cfg: the `[optimizer]` table.
        learning_rate: the default LR (for Prodigy a multiplier, 1.0 by convention).

    Raises:
        ConfigError: unknown name, or the optimizer's package is not installed (names the pip command).
    """
    builder = _BUILDERS.get(cfg.name)
    if builder is None:
        raise ConfigError(f"optimizer.name = {cfg.name!r} is not known; use one of {', '.join(_BUILDERS)}")
    return builder(_with_lr(param_groups, learning_rate), cfg, learning_rate)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, max_steps: int) -> LRScheduler:
    """A LambdaLR stepped once per optimizer step: linear warmup over cfg.warmup_steps, then the named decay.

    Adafactor with relative_step schedules itself; it gets transformers' AdafactorSchedule, which
    only reports the LR Adafactor uses (for logging).

    Raises:
        ConfigError: the warmup does not end before the last step.
    """
    if cfg.name == "adafactor" and cfg.relative_step:
        if cfg.scheduler != "constant" or cfg.warmup_steps:
            warnings.warn("optimizer.relative_step = true: Adafactor sets its own step size, so "
                          "optimizer.scheduler and optimizer.warmup_steps are ignored", stacklevel=2)
        return _require("transformers.optimization", cfg.name, "transformers").AdafactorSchedule(optimizer)
    if cfg.warmup_steps >= max_steps and cfg.scheduler != "constant":
        raise ConfigError(f"optimizer.warmup_steps = {cfg.warmup_steps}: must be below training.max_steps = "
                          f"{max_steps} for the {cfg.scheduler} schedule to decay")
    from diffusers.optimization import get_scheduler

    # diffusers' "constant" ignores warmup; its "cosine" keeps a half cycle (num_cycles only for restarts).
    name = "constant_with_warmup" if cfg.scheduler == "constant" and cfg.warmup_steps else cfg.scheduler
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=max_steps, num_cycles=cfg.num_cycles, power=cfg.power)


def lr_after(cfg: OptimizerConfig, learning_rate: float, max_steps: int, steps_done: int) -> float | None:
    """The learning rate of the optimizer step that follows `steps_done` steps of a `max_steps` schedule;
    None where Adafactor sets its own."""
    if cfg.name == "adafactor" and cfg.relative_step:
        return None
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=learning_rate)
    schedule = build_lr_scheduler(probe, cfg, max_steps)
    return learning_rate * schedule.lr_lambdas[0](steps_done)


def clip_gradients(accelerator, params: list, max_norm: float, fused=None) -> tuple[torch.Tensor, bool]:
    """Clip the synced gradients of `params` to `max_norm` (0: measure only).

    Returns:
        (the gradient norm before clipping, whether the gradients are finite). fp16's loss scaler
        skips overflowing steps itself, so they count as finite; the fused backward (`fused`, the
        optimizer of memory.fused_backward) clipped per tensor inside backward and reports both.
    """
    if fused is not None:
        return fused.pop_grad_norm(), not fused.pop_nonfinite()
    if max_norm > 0:
        norm = accelerator.clip_grad_norm_(params, max_norm)
    else:
        norms = [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    return norm, accelerator.scaler is not None or bool(torch.isfinite(norm))
