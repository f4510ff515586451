"""Optimizers and learning-rate schedules, by name from the `[optimizer]` table."""

from __future__ import annotations

import logging
import warnings

import torch

from finetune.errors import ConfigError


def _require(module: str, what: str, package: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ConfigError(f"optimizer.name = {what!r} needs {package}: pip install {package}") from None


def _bitsandbytes():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU-kernel notice is not for users
    return _require("bitsandbytes.optim", "adamw8bit", "bitsandbytes")


def build_optimizer(param_groups: list[dict], cfg, learning_rate: float) -> torch.optim.Optimizer:
    """The optimizer `cfg.name` names over `param_groups` (each may carry its own "lr").

    Raises:
        ConfigError: the optimizer's package is not installed (names the pip command).
    """
    groups = [{**group, "lr": group.get("lr") or learning_rate} for group in param_groups]
    common = {"lr": learning_rate, "weight_decay": cfg.weight_decay}
    if cfg.name == "adamw":
        # The fused kernel is one launch for all parameters; CUDA only.
        fused = all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, betas=cfg.betas, eps=cfg.eps, fused=fused or None, **common)
    if cfg.name in ("adamw8bit", "paged_adamw8bit"):
        bnb = _bitsandbytes()
        cls = bnb.AdamW8bit if cfg.name == "adamw8bit" else bnb.PagedAdamW8bit
        return cls(groups, betas=cfg.betas, eps=cfg.eps, **common)
    if cfg.name == "lion8bit":
        return _bitsandbytes().Lion8bit(groups, betas=cfg.betas, **common)
    if cfg.name == "adafactor":
        from transformers.optimization import Adafactor

        if cfg.relative_step:
            # Adafactor picks its own step size; an explicit lr would contradict it.
            groups = [{k: v for k, v in g.items() if k != "lr"} for g in groups]
            return Adafactor(groups, lr=None, relative_step=True, scale_parameter=True, warmup_init=True,
                             weight_decay=cfg.weight_decay)
        return Adafactor(groups, relative_step=False, scale_parameter=False, warmup_init=False, **common)
    if cfg.name == "prodigy":
        prodigy = _require("prodigyopt", "prodigy", "prodigyopt")
        if not 0.1 <= learning_rate <= 10:
            warnings.warn(f"Prodigy estimates the step size itself and expects learning_rate ≈ 1.0 (got {learning_rate})",
                          stacklevel=2)
        return prodigy.Prodigy(groups, betas=cfg.betas, **common)
    raise ConfigError(f"optimizer.name = {cfg.name!r} is not known")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg, max_steps: int):
    """A LambdaLR stepped once per optimizer step: warmup, then the named decay."""
    from diffusers.optimization import get_scheduler

    kwargs = {}
    if cfg.scheduler == "cosine_with_restarts":
        kwargs["num_cycles"] = cfg.num_cycles
    if cfg.scheduler == "polynomial":
        kwargs["power"] = cfg.power
    name = "constant_with_warmup" if cfg.scheduler == "constant" and cfg.warmup_steps else cfg.scheduler
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=max_steps, **kwargs)
