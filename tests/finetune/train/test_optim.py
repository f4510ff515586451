"""Optimizers by name (updates, 8-bit state, resumable state, missing packages) and LR schedule shapes."""

from __future__ import annotations

import copy
import math
import sys
import warnings

import pytest
import torch

from finetune.config import OptimizerConfig
from finetune.errors import ConfigError
from finetune.train.optim import build_lr_scheduler, build_optimizer

ALL_NAMES = ["adamw", "adamw8bit", "paged_adamw8bit", "lion8bit", "adafactor", "prodigy"]


def quadratic_problem(numel: int = 64, seed: int = 0) -> tuple[torch.nn.Parameter, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(numel, generator=g)), torch.randn(numel, generator=g)


def step(optimizer: torch.optim.Optimizer, param: torch.Tensor, target: torch.Tensor) -> float:
    optimizer.zero_grad()
    loss = ((param - target) ** 2).mean()
    loss.backward()
    optimizer.step()
    return loss.item()


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("name", ALL_NAMES)
def test_each_optimizer_moves_parameters_downhill(name):
    param, target = quadratic_problem()
    cfg = OptimizerConfig(name=name, weight_decay=0.0)
    optimizer = build_optimizer([{"params": [param]}], cfg, 1.0 if name == "prodigy" else 1e-2)
    start = param.detach().clone()
    first = step(optimizer, param, target)
    # The first update points against the gradient, elementwise (Adam-like and sign-based alike).
    moved = param.detach() - start
    assert (torch.sign(moved) == torch.sign(target - start)).float().mean() > 0.95
    for _ in range(30):
        last = step(optimizer, param, target)
    assert last < first


@pytest.mark.parametrize("name, class_name", [
    ("adamw", "AdamW"), ("adamw8bit", "AdamW8bit"), ("paged_adamw8bit", "PagedAdamW8bit"),
    ("lion8bit", "Lion8bit"), ("adafactor", "Adafactor"), ("prodigy", "Prodigy"),
])
def test_each_name_builds_its_optimizer(name, class_name):
    param = torch.nn.Parameter(torch.zeros(4))
    optimizer = build_optimizer([{"params": [param]}], OptimizerConfig(name=name), 1.0)
    assert type(optimizer).__name__ == class_name


def test_adamw_uses_the_group_lrs_and_options():
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    cfg = OptimizerConfig(name="adamw", betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)
    optimizer = build_optimizer([{"params": [a]}, {"params": [b], "lr": 5e-5}], cfg, 1e-4)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 5e-5]
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6 and group["weight_decay"] == 0.05
    assert not group["fused"]  # CPU parameters: no fused kernel


def test_caller_groups_are_not_modified():
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    build_optimizer(groups, OptimizerConfig(), 1e-4)
    assert "lr" not in groups[0]


def test_group_lrs_scale_the_step():
    """The text-encoder group with half the LR moves half as far on AdamW's first (sign-like) step."""
    a, b = torch.nn.Parameter(torch.zeros(8)), torch.nn.Parameter(torch.zeros(8))
    optimizer = build_optimizer([{"params": [a]}, {"params": [b], "lr": 5e-3}], OptimizerConfig(weight_decay=0), 1e-2)
    ((a - 1) ** 2).sum().add(((b - 1) ** 2).sum()).backward()
    optimizer.step()
    assert torch.allclose(a.detach(), torch.full((8,), 1e-2), rtol=1e-4)
    assert torch.allclose(b.detach(), torch.full((8,), 5e-3), rtol=1e-4)


@pytest.mark.parametrize("name", ["adamw8bit", "lion8bit"])
def test_8bit_state_is_8bit_and_round_trips_exactly(name):
    cfg = OptimizerConfig(name=name)
    param, target = quadratic_problem(numel=64 * 128)  # over min_8bit_size (4096): 8-bit state
    optimizer = build_optimizer([{"params": [param]}], cfg, 1e-3)
    for _ in range(3):
        step(optimizer, param, target)
    state = optimizer.state[param]
    assert state["state1"].dtype == torch.uint8
    assert state["state1"].numel() == param.numel()

    saved_param = param.detach().clone()
    saved_state = copy.deepcopy(optimizer.state_dict())
    step(optimizer, param, target)  # the uninterrupted run
    uninterrupted = param.detach().clone()

    resumed = torch.nn.Parameter(saved_param.clone())
    fresh = build_optimizer([{"params": [resumed]}], cfg, 1e-3)
    fresh.load_state_dict(saved_state)
    step(fresh, resumed, target)
    assert torch.equal(resumed.detach(), uninterrupted)


def test_small_tensors_keep_32bit_state_in_8bit_optimizers():
    param, target = quadratic_problem(numel=64)
    optimizer = build_optimizer([{"params": [param]}], OptimizerConfig(name="adamw8bit"), 1e-3)
    step(optimizer, param, target)
    assert optimizer.state[param]["state1"].dtype == torch.float32


def test_lion_uses_its_own_betas_unless_set():
    param = torch.nn.Parameter(torch.zeros(4))
    default = build_optimizer([{"params": [param]}], OptimizerConfig(name="lion8bit"), 1e-4)
    assert default.param_groups[0]["betas"] == (0.9, 0.99)
    chosen = build_optimizer([{"params": [param]}], OptimizerConfig(name="lion8bit", betas=(0.95, 0.98)), 1e-4)
    assert chosen.param_groups[0]["betas"] == (0.95, 0.98)


def test_adafactor_fixed_lr_and_relative_step():
    param = torch.nn.Parameter(torch.zeros(4))
    fixed = build_optimizer([{"params": [param], "lr": 3e-4}], OptimizerConfig(name="adafactor"), 1e-4)
    group = fixed.param_groups[0]
    assert group["lr"] == 3e-4 and not group["relative_step"] and not group["warmup_init"]
    relative = build_optimizer([{"params": [param], "lr": 3e-4}], OptimizerConfig(name="adafactor", relative_step=True),
                               1e-4)
    group = relative.param_groups[0]
    assert group["lr"] is None and group["relative_step"] and group["warmup_init"] and group["scale_parameter"]


def test_adafactor_relative_step_gets_a_reporting_schedule():
    param, target = quadratic_problem()
    cfg = OptimizerConfig(name="adafactor", relative_step=True)
    optimizer = build_optimizer([{"params": [param]}], cfg, 1e-4)
    scheduler = build_lr_scheduler(optimizer, cfg, max_steps=10)
    lrs = []
    for _ in range(3):
        step(optimizer, param, target)
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    # warmup_init: Adafactor's own step size grows as 1e-6 · t.
    assert lrs[0] == pytest.approx(1e-6 * 1, rel=0.2) and lrs[2] > lrs[1] > lrs[0]
    with pytest.warns(UserWarning, match="ignored"):
        build_lr_scheduler(optimizer, OptimizerConfig(name="adafactor", relative_step=True, scheduler="cosine"), 10)


def test_prodigy_warns_when_lr_is_far_from_one():
    param = torch.nn.Parameter(torch.zeros(4))
    with pytest.warns(UserWarning, match="1.0"):
        build_optimizer([{"params": [param]}], OptimizerConfig(name="prodigy"), 1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer = build_optimizer([{"params": [param]}], OptimizerConfig(name="prodigy", warmup_steps=5), 1.0)
    assert optimizer.param_groups[0]["safeguard_warmup"]  # needed with an LR warmup


@pytest.mark.parametrize("name, module, package", [
    ("prodigy", "prodigyopt", "prodigyopt"),
    ("adamw8bit", "bitsandbytes.optim", "bitsandbytes"),
    ("lion8bit", "bitsandbytes.optim", "bitsandbytes"),
])
def test_missing_package_names_what_to_install(monkeypatch, name, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    param = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ConfigError) as error:
        build_optimizer([{"params": [param]}], OptimizerConfig(name=name), 1.0)
    assert str(error.value) == f'optimizer.name = "{name}" needs {package}: pip install {package}'


def lr_sequence(cfg: OptimizerConfig, max_steps: int, base_lr: float = 1.0) -> list[float]:
    """The LR used at each optimizer step 0..max_steps-1 (the scheduler steps after each)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base_lr)
    scheduler = build_lr_scheduler(optimizer, cfg, max_steps)
    lrs = []
    for _ in range(max_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_constant_with_and_without_warmup():
    assert lr_sequence(OptimizerConfig(scheduler="constant"), 5) == [1.0] * 5
    lrs = lr_sequence(OptimizerConfig(scheduler="constant", warmup_steps=4), 8)
    assert lrs == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0])


def test_cosine_warms_up_then_decays_to_near_zero():
    lrs = lr_sequence(OptimizerConfig(scheduler="cosine", warmup_steps=10), 110, base_lr=2e-4)
    assert lrs[:11] == pytest.approx([2e-4 * i / 10 for i in range(11)])
    decay = lrs[10:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))  # one half cycle: monotone
    assert lrs[60] == pytest.approx(1e-4, rel=1e-6)  # half way: half the LR
    assert lrs[-1] < 2e-4 * 1e-3


@pytest.mark.parametrize("cycles", [1, 3])
def test_cosine_with_restarts_restarts_num_cycles_times(cycles):
    lrs = lr_sequence(OptimizerConfig(scheduler="cosine_with_restarts", num_cycles=cycles), 120)
    jumps = [i for i in range(1, len(lrs)) if lrs[i] > lrs[i - 1] + 0.5]
    assert len(jumps) == cycles - 1
    assert lrs[0] == 1.0 and lrs[-1] < 0.01


def test_linear_and_polynomial_decay():
    linear = lr_sequence(OptimizerConfig(scheduler="linear", warmup_steps=2), 12)
    assert linear[2] == pytest.approx(1.0) and linear[7] == pytest.approx(0.5)
    assert linear[-1] == pytest.approx(0.1)
    square = lr_sequence(OptimizerConfig(scheduler="polynomial", power=2.0), 10)
    assert square[5] == pytest.approx(0.25, rel=1e-4)  # (1 - 5/10)²
    assert lr_sequence(OptimizerConfig(scheduler="polynomial", power=1.0), 10)[5] == pytest.approx(0.5, rel=1e-4)


def test_schedule_scales_each_group_lr():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer([{"params": [a]}, {"params": [b], "lr": 1e-5}], OptimizerConfig(scheduler="linear"),
                                1e-4)
    scheduler = build_lr_scheduler(optimizer, OptimizerConfig(scheduler="linear"), 10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([5e-5, 5e-6])


def test_schedule_state_round_trips():
    cfg = OptimizerConfig(scheduler="cosine", warmup_steps=3)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_lr_scheduler(optimizer, cfg, 20)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    fresh_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    fresh = build_lr_scheduler(fresh_optimizer, cfg, 20)
    fresh.load_state_dict(state)
    fresh_optimizer.step()
    fresh.step()
    optimizer.step()
    scheduler.step()
    assert fresh.get_last_lr() == scheduler.get_last_lr()
    assert scheduler.get_last_lr()[0] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 17)))


def test_warmup_longer_than_training_is_a_config_error():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match=r"optimizer\.warmup_steps = 10.*training\.max_steps = 10"):
        build_lr_scheduler(optimizer, OptimizerConfig(scheduler="cosine", warmup_steps=10), 10)
