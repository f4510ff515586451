"""The pickle-free training state (state_io): optimizers, schedules, EMA, scaler and RNG round-trip bit for
bit through safetensors + JSON, and a planted pickle is refused without ever being opened."""

from __future__ import annotations

import copy
import json
import pickle
import random

import numpy as np
import pytest
import torch

from finetune.errors import CheckpointError
from finetune.train import checkpoint as ckpt
from finetune.train.resume import resume_point
from finetune.train import state_io


def assert_same_tree(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same_tree(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    else:
        assert a == b


def train_a_little(optimizer, params, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = sum((p * torch.randn(p.shape, generator=generator)).square().sum() for p in params)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def fused_adamw(params):
    from finetune.memory.fused import FusedBackwardOptimizer

    # Steps inside backward; the test loop's step() does nothing.
    return FusedBackwardOptimizer([{"params": params, "lr": 1e-2}], lambda groups: torch.optim.AdamW(groups), max_grad_norm=1.0)


def built(name):
    """The project's optimizer `name` (bitsandbytes' 8-bit ones give the 80x80 weight, > 4096 elements,
    8-bit state and the bias 32-bit state)."""
    from finetune.config import OptimizerConfig
    from finetune.train.optim import build_optimizer

    def make(params):
        if name.endswith("8bit") or name == "prodigy":
            pytest.importorskip("prodigyopt" if name == "prodigy" else "bitsandbytes")
        return build_optimizer([{"params": params}], OptimizerConfig(name=name), 1e-2)
    return make


OPTIMIZERS = {name: built(name) for name in ("adamw", "adamw8bit", "lion8bit", "adafactor", "prodigy")}
OPTIMIZERS["fused_backward"] = fused_adamw


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_state_round_trips_bitwise_and_steps_on_identically(tmp_path, name):
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(80, 80)), torch.nn.Parameter(torch.randn(80))]
    optimizer = OPTIMIZERS[name](weights)
    train_a_little(optimizer, weights, 3, seed=1)
    state_io.write_tree(optimizer.state_dict(), tmp_path, "opt")
    assert not list(tmp_path.glob("*.pkl"))
    assert_same_tree(state_io.read_tree(tmp_path, "opt"), optimizer.state_dict())

    copies = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    resumed = OPTIMIZERS[name](copies)
    resumed.load_state_dict(state_io.read_tree(tmp_path, "opt"))
    train_a_little(optimizer, weights, 2, seed=2)
    train_a_little(resumed, copies, 2, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(weights, copies))


def test_lr_schedule_round_trips_and_continues_identically(tmp_path):
    from diffusers.optimization import get_scheduler

    def schedule():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=2, num_training_steps=10)

    first = schedule()
    for _ in range(4):
        first.step()
    state_io.write_tree(first.state_dict(), tmp_path, "sched")
    second = schedule()
    second.load_state_dict(state_io.read_tree(tmp_path, "sched"))
    assert_same_tree(second.state_dict(), first.state_dict())
    for _ in range(3):
        first.step()
        second.step()
        assert first.get_last_lr() == second.get_last_lr()


def test_every_rng_round_trips(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # numpy caches the second gaussian: part of its state
    state_io.write_tree(state_io.rng_state(), tmp_path, "rng_0")
    drawn = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state_io.set_rng_state(state_io.read_tree(tmp_path, "rng_0"))
    again = (random.random(), np.random.normal(), torch.rand(3))
    assert drawn[:2] == again[:2] and torch.equal(drawn[2], again[2])


def test_tags_and_odd_keys_survive_json():
    tree = {"__tensor__": 1, "a": (1, 2.5, None, True), "n": {3: "x", (1, 2): [float("inf")]},
            "arr": np.arange(5, dtype=np.uint32)}
    tensors = {}
    assert_same_tree(state_io.unflatten(state_io.flatten(tree, tensors), tensors), tree)
    with pytest.raises(TypeError, match="without pickle"):
        state_io.flatten({"f": object()}, {})


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    model[0].requires_grad_(False)
    model, optimizer = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=0.1))
    acc.ema = EMAModel([p for p in model.parameters() if p.requires_grad], decay=0.9)
    acc.register_for_checkpointing(acc.ema)
    acc.model, acc.opt = model, optimizer
    yield acc
    acc.free_memory()


def step(acc):
    acc.model(torch.randn(2, 4)).sum().backward()
    acc.opt.step()
    acc.opt.zero_grad()
    acc.ema.step([p for p in acc.model.parameters() if p.requires_grad])


def test_the_whole_training_state_round_trips(accelerator, tmp_path):
    acc = accelerator
    step(acc)
    acc.scaler = scaler_after_a_step()  # as mixed_precision = "fp16" has it
    state_io.save_training_state(acc, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["rng_0.json", "rng_0.safetensors", "trainable_0.safetensors", "training_state.json",
                     "training_state.safetensors"]
    # Deep copies: state dicts hold the live tensors, which the next step changes in place.
    expected = copy.deepcopy(([p.detach() for p in acc.model.parameters()], acc.ema.state_dict(), acc.opt.state_dict()))
    scaler_state = acc.scaler.state_dict()
    step(acc)  # what the resume must undo
    acc.scaler.update(new_scale=3.0)
    state_io.load_training_state(acc, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(acc.model.parameters(), expected[0]))
    assert_same_tree(acc.ema.state_dict(), expected[1])
    assert_same_tree(acc.opt.state_dict(), expected[2])
    assert acc.scaler.state_dict() == scaler_state and acc.scaler.get_scale() == 2048.0


def scaler_after_a_step():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler.scale(weight.sum()).backward()
    scaler.step(optimizer)
    scaler.update()  # grows the scale to 2048 (growth_interval 1)
    return scaler


class Payload:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"])
def test_a_planted_pickle_is_refused_and_never_run(accelerator, tmp_path, name):
    root, marker = tmp_path / "checkpoints", tmp_path / "code-ran"
    folder = ckpt.save_checkpoint(accelerator, root, ckpt.TrainState(step=2), "a = 1\n", lambda folder: None)
    (folder / name).write_bytes(pickle.dumps(Payload(marker)))
    for resume in ("latest", str(folder)):
        with pytest.raises(CheckpointError, match=rf"{name}.*could run code"):
            resume_point(root, resume)
    with pytest.raises(CheckpointError, match=name):
        state_io.load_checkpoint_state(accelerator, folder)
    (folder / name).rename(folder / "innocent.json")  # a pickle by its first bytes, whatever its name
    with pytest.raises(CheckpointError, match="innocent.json"):
        state_io.load_checkpoint_state(accelerator, folder)
    assert not marker.exists()


def test_a_checkpoint_of_the_pickled_format_says_how_to_go_on(accelerator, tmp_path):
    root = tmp_path / "checkpoints"
    folder = ckpt.save_checkpoint(accelerator, root, ckpt.TrainState(step=2), "a = 1\n",
                                  lambda folder: (folder / "lora.safetensors").write_bytes(b"x"))
    (folder / "files.json").unlink()  # as written before files.json and pickle-free state
    (folder / "random_states_0.pkl").write_bytes(pickle.dumps({"step": 2}))
    with pytest.raises(CheckpointError, match=r"earlier version.*lora.init_from = .*lora.safetensors"):
        resume_point(root, "latest")


def test_a_folder_claiming_fsdp_state_is_refused_by_a_run_without_fsdp(accelerator, tmp_path):
    marker = tmp_path / "code-ran"
    folder = ckpt.save_checkpoint(accelerator, tmp_path / "checkpoints", ckpt.TrainState(step=2), "a = 1\n",
                                  lambda folder: None)
    (folder / "random_states_0.pkl").write_bytes(pickle.dumps(Payload(marker)))
    manifest = json.loads((folder / "files.json").read_text())
    (folder / "files.json").write_text(json.dumps({**manifest, "state": "accelerate-fsdp"}))  # pickles expected
    with pytest.raises(CheckpointError, match="FSDP checkpoint.*same FSDP launch"):
        state_io.load_checkpoint_state(accelerator, folder)
    assert not marker.exists()
