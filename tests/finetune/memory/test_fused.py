"""Optimizer step in backward (same updates, freed gradients, per-tensor clipping, schedules, exact resume)
and bf16 stochastic rounding (unbiased, deterministic, exact where representable, trains where nearest stalls)."""

from __future__ import annotations

import io

import pytest
import torch

from finetune.config import OptimizerConfig
from finetune.memory.fused import FusedBackwardOptimizer, stochastic_round_
from finetune.train import state_io
from finetune.train.optim import build_lr_scheduler, build_optimizer

BF16_ULP_AT_1 = 2.0**-7  # bf16 keeps 7 explicit mantissa bits


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    # The 64 x 128 weight (8192 elements) is over bitsandbytes' min_8bit_size (4096): it gets 8-bit state.
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.GELU(), torch.nn.Linear(64, 128), torch.nn.GELU(),
                                torch.nn.Linear(128, 4))
    return model.to(dtype)


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)


def mse(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    return (model(x.to(dtype)).float() - y).square().mean()


def fused(model: torch.nn.Module, cfg: OptimizerConfig, lr: float = 1e-2, **kwargs) -> FusedBackwardOptimizer:
    # The factory the trainer passes: the configured optimizer, built over one parameter's group.
    return FusedBackwardOptimizer([{"params": list(model.parameters())}],
                                  lambda groups: build_optimizer(groups, cfg, lr), **kwargs)


def sgd(model: torch.nn.Module, groups: list[dict] | None = None, **kwargs) -> FusedBackwardOptimizer:
    groups = groups or [{"params": list(model.parameters()), "lr": 0.1}]
    return FusedBackwardOptimizer(groups, lambda g: torch.optim.SGD(g), **kwargs)


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


# --- optimizer step in backward -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "lion8bit", "adafactor"])
def test_fused_updates_equal_the_ordinary_optimizer(name):
    cfg, (x, y) = OptimizerConfig(name=name), batch()
    plain_model, fused_model = mlp(), mlp()
    plain = build_optimizer([{"params": list(plain_model.parameters())}], cfg, 1e-2)
    optimizer = fused(fused_model, cfg)
    for _ in range(5):
        mse(plain_model, x, y).backward()
        plain.step()
        plain.zero_grad()
        mse(fused_model, x, y).backward()
        optimizer.step()
    assert_same_parameters(plain_model, fused_model)  # bitwise: one optimizer per tensor does the same math
    if name == "adamw8bit":
        assert optimizer.optimizers[2].state[fused_model[2].weight]["state1"].dtype == torch.uint8


def test_gradients_are_freed_and_never_coexist():
    model, (x, y) = mlp(), batch()
    params = list(model.parameters())
    seen = []

    def observe(param):  # registered first, so it runs just before the optimizer's hook
        seen.append(sum(p.grad is not None for p in params))

    for p in params:
        p.register_post_accumulate_grad_hook(observe)
    fused(model, OptimizerConfig())
    for _ in range(2):
        mse(model, x, y).backward()
    assert seen == [1] * (2 * len(params))  # each parameter's gradient, alone
    assert all(p.grad is None for p in params)


def test_clipping_is_per_tensor():
    x, y = batch()
    model, reference = mlp(), mlp()
    optimizer = sgd(model, max_grad_norm=0.1)
    mse(model, x, y).backward()

    loss = mse(reference, x, y)
    loss.backward()
    norms = [p.grad.norm() for p in reference.parameters()]
    assert min(norms) < 0.1 < max(norms)  # some tensors are clipped, some are not
    for p in reference.parameters():
        torch.nn.utils.clip_grad_norm_([p], 0.1)
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    assert_same_parameters(reference, model)
    # The logged norm is the global one, before clipping.
    assert optimizer.pop_grad_norm() == pytest.approx(torch.stack(norms).norm().item(), rel=1e-6)
    assert optimizer.pop_grad_norm() is None


def test_lr_schedule_reaches_every_inner_optimizer():
    model = torch.nn.Linear(3, 2)
    # Two groups, as the trainer's UNet and text-encoder groups; SGD on sum(p) moves each weight by -lr.
    groups = [{"params": [model.weight], "lr": 1.0}, {"params": [model.bias], "lr": 0.5}]
    optimizer = sgd(model, groups)
    scheduler = build_lr_scheduler(optimizer, OptimizerConfig(scheduler="constant", warmup_steps=4), max_steps=8)
    moves = []
    for step in range(6):
        if step == 3:  # accelerate.prepare does this round trip; the schedule must still reach the new groups
            optimizer.load_state_dict(optimizer.state_dict())
        before = [p.detach().clone() for p in (model.weight, model.bias)]
        (model.weight.sum() + model.bias.sum()).backward()
        optimizer.step()
        scheduler.step()
        moves += [(b - p.detach()).mean().item() for b, p in zip(before, (model.weight, model.bias))]
    warmup = [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert moves == pytest.approx([lr * w for w in warmup for lr in (1.0, 0.5)])  # (weight, bias) per step
    assert [inner.param_groups[0]["lr"] for inner in optimizer.optimizers] == [1.0, 0.5]


def train(model, optimizer, scheduler, steps: int, seed: int = 1) -> None:
    for i in range(steps):
        mse(model, *batch(seed + i)).backward()
        optimizer.step()
        scheduler.step()


RESUME_CASES = [("adamw", torch.float32, False), ("adamw", torch.bfloat16, True), ("adamw8bit", torch.bfloat16, True)]


@pytest.mark.parametrize("name, dtype, rounding", RESUME_CASES)
def test_resume_from_state_dict_is_bitwise(name, dtype, rounding):
    cfg = OptimizerConfig(name=name, scheduler="cosine", warmup_steps=2)

    def build(seed):
        model = mlp(seed, dtype)
        optimizer = fused(model, cfg, stochastic_rounding=rounding, seed=7)
        return model, optimizer, build_lr_scheduler(optimizer, cfg, max_steps=10)

    model, optimizer, scheduler = build(0)
    train(model, optimizer, scheduler, 3)
    saved = io.BytesIO()  # through bytes, as a checkpoint goes through disk
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, saved)
    train(model, optimizer, scheduler, 3, seed=4)  # the uninterrupted run

    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    resumed, resumed_optimizer, resumed_scheduler = build(123)
    resumed.load_state_dict(state["model"])
    resumed_optimizer.load_state_dict(state["optimizer"])
    resumed_scheduler.load_state_dict(state["scheduler"])
    train(resumed, resumed_optimizer, resumed_scheduler, 3, seed=4)
    assert_same_parameters(model, resumed)


def test_accelerate_prepare_and_checkpoint_resume_exactly(tmp_path):
    from accelerate import Accelerator

    cfg = OptimizerConfig(name="adamw8bit", scheduler="linear", warmup_steps=2)

    def prepared(seed):
        acc = Accelerator(cpu=True)
        model = mlp(seed, torch.bfloat16)
        optimizer = fused(model, cfg, stochastic_rounding=True)
        scheduler = build_lr_scheduler(optimizer, cfg, max_steps=10)  # built before prepare, as in Run
        model, optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(scheduler)
        return acc, model, optimizer, scheduler

    acc, model, optimizer, scheduler = prepared(0)
    train(model, optimizer, scheduler, 3)
    state_io.save_training_state(acc, tmp_path)  # the checkpoint's pickle-free state
    train(model, optimizer, scheduler, 3, seed=4)
    inner = optimizer.optimizer.optimizers[0]  # prepare wrapped ours in an AcceleratedOptimizer
    assert inner.param_groups[0]["lr"] == pytest.approx(1e-2 * (10 - 6) / (10 - 2))  # the schedule got through

    acc2, resumed, resumed_optimizer, resumed_scheduler = prepared(123)
    state_io.load_training_state(acc2, tmp_path)
    train(resumed, resumed_optimizer, resumed_scheduler, 3, seed=4)
    assert_same_parameters(model, resumed)
    acc.free_memory()
    acc2.free_memory()


def test_load_refuses_state_of_another_run():
    optimizer = sgd(mlp(), seed=1)
    with pytest.raises(ValueError, match="seed 2"):
        optimizer.load_state_dict({**optimizer.state_dict(), "seed": 2})
    with pytest.raises(ValueError, match="holds 6 parameters, this optimizer has 1"):
        sgd(torch.nn.Linear(2, 2, bias=False), seed=1).load_state_dict(optimizer.state_dict())


def test_remove_unregisters_the_hooks():
    model, (x, y) = mlp(), batch()
    optimizer = sgd(model)
    optimizer.remove()
    before = [p.detach().clone() for p in model.parameters()]
    mse(model, x, y).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


# --- stochastic rounding ----------------------------------------------------------------------------

def rounded(source: torch.Tensor, seed: int) -> torch.Tensor:
    target = torch.empty_like(source, dtype=torch.bfloat16)
    stochastic_round_(target, source, torch.Generator().manual_seed(seed))
    return target


def test_stochastic_round_is_unbiased_where_nearest_is_not():
    # 0.3 of the way between two bf16 neighbours, both signs, in two binades.
    values = torch.tensor([1.0, -1.0, 2.0**-20, -(2.0**10)]) * (1 + 0.3 * BF16_ULP_AT_1)
    source = values.repeat_interleave(100_000).reshape(4, -1)
    ulp = values.abs() * BF16_ULP_AT_1 / (1 + 0.3 * BF16_ULP_AT_1)
    mean = rounded(source, seed=0).double().mean(dim=1)
    nearest = values.bfloat16().double()
    assert ((nearest - values) / ulp).abs().min() > 0.29  # nearest always lands 0.3 ulp off
    assert ((mean - values) / ulp).abs().max() < 0.01  # SR: 0.3 ± 0.0015 of the draws round up


def test_small_updates_accumulate_only_with_stochastic_rounding():
    nearest = torch.ones(1000, dtype=torch.bfloat16)
    stochastic = torch.ones(1000, dtype=torch.bfloat16)
    for i in range(1000):  # 1e-4 is 1/78 of an ulp at 1.0
        nearest = (nearest.float() + 1e-4).bfloat16()
        stochastic_round_(stochastic, stochastic.float() + 1e-4, torch.Generator().manual_seed(i))
    assert torch.all(nearest == 1.0)
    assert stochastic.float().mean().item() == pytest.approx(1.1, abs=0.01)


def test_stochastic_round_is_deterministic_per_generator():
    source = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rounded(source, seed=3), rounded(source, seed=3))
    assert not torch.equal(rounded(source, seed=3), rounded(source, seed=4))


def test_representable_values_are_copied_exactly():
    finite = torch.randn(10_000, generator=torch.Generator().manual_seed(0)).bfloat16()
    tiny = torch.finfo(torch.bfloat16)
    special = torch.tensor([0.0, -0.0, tiny.max, -tiny.max, tiny.tiny, tiny.smallest_normal / 8, float("inf"),
                            float("-inf")], dtype=torch.bfloat16)
    source = torch.cat([finite, special]).float()
    for seed in range(5):
        assert torch.equal(rounded(source, seed).view(torch.int16), source.bfloat16().view(torch.int16))
    assert rounded(torch.tensor([float("nan")]), seed=0).isnan().all()


def test_stochastic_round_checks_dtypes_and_shapes():
    g = torch.Generator()
    with pytest.raises(TypeError, match="float32 into bfloat16"):
        stochastic_round_(torch.zeros(2, dtype=torch.float16), torch.zeros(2), g)
    with pytest.raises(ValueError, match="shapes differ"):
        stochastic_round_(torch.zeros(2, dtype=torch.bfloat16), torch.zeros(3), g)


def regression(dtype: torch.dtype, rounding: bool) -> tuple[float, float]:
    """(initial, final) fp32-evaluated loss of a linear fit whose Adam steps (1e-3) are below bf16's half-ulp."""
    g = torch.Generator().manual_seed(0)
    w_true = (1 + torch.rand(8, 64, generator=g)) * torch.sign(torch.randn(8, 64, generator=g))  # |w| in [1, 2)
    w0 = (w_true + 0.05 * torch.randn(8, 64, generator=g)).bfloat16()  # the same start for every run
    x = torch.randn(128, 64, generator=g)
    y = x @ w_true.T
    w = torch.nn.Parameter(w0.to(dtype))
    adamw = OptimizerConfig(weight_decay=0)
    FusedBackwardOptimizer([{"params": [w]}], lambda groups: build_optimizer(groups, adamw, 1e-3),
                           stochastic_rounding=rounding)

    def loss(weight):
        return (x @ weight.float().T - y).square().mean().item()

    initial = loss(w.detach())
    for _ in range(300):
        (x.to(dtype) @ w.T).float().sub(y).square().mean().backward()
    return initial, loss(w.detach())


def test_bf16_with_stochastic_rounding_trains_where_nearest_rounding_stalls():
    initial, fp32 = regression(torch.float32, rounding=False)
    _, nearest = regression(torch.bfloat16, rounding=False)
    _, stochastic = regression(torch.bfloat16, rounding=True)
    assert nearest == initial  # every update rounded away: not one weight moved
    assert fp32 < 0.002 * initial
    # The best bf16 weights leave 0.2% of the initial loss; constant-LR jitter on the bf16 grid adds the rest.
    assert stochastic < 0.02 * initial


def test_stochastic_rounding_keeps_fp32_state_and_releases_the_fp32_copy():
    model, (x, y) = mlp(0, torch.bfloat16), batch()
    model[0].float()  # a mixed model: fp32 tensors are stepped in place, without rounding
    optimizer = fused(model, OptimizerConfig(name="adamw8bit"), stochastic_rounding=True)
    losses = []
    for _ in range(20):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # casts the activations between the two dtypes
            loss = mse(model, x, y)
        losses.append(loss.item())
        loss.backward()
    assert losses[-1] < 0.7 * losses[0]
    big = optimizer.optimizers[2]  # model[2].weight, bf16, 8192 elements
    (scratch,) = big.param_groups[0]["params"]
    assert scratch is not model[2].weight and scratch.numel() == 0  # only holds data inside its hook
    assert big.state[scratch]["state1"].dtype == torch.uint8
    assert model[2].weight.dtype == torch.bfloat16
    assert optimizer.optimizers[0].param_groups[0]["params"][0] is model[0].weight  # fp32: no stand-in
    assert optimizer.optimizers[5].state[optimizer.param_groups[5]["params"][0]]["state1"].dtype == torch.float32
