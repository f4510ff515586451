"""An epoch is exactly one pass: the last accumulation window of an epoch steps at its end, averaged over its micro-batches."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from bucketing.manifest import load_manifest
from conftest import make_image
from finetune.config import load_config
from finetune.plan import run_plan
from finetune.train.recipe import train
from finetune.train.step import epoch_window
from trainer_runs import write_config


def test_the_last_window_of_an_epoch_steps_at_its_end_with_the_mean_of_its_micro_batches():
    AcceleratorState._reset_state(reset_partial_state=False)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=4)
    model = acc.prepare(torch.nn.Linear(3, 1, bias=False))
    inputs = torch.arange(30, dtype=torch.float32).reshape(10, 3)
    synced, grads = [], []
    for epoch in range(2):  # the second epoch's windows start again at its first batch
        for index, x in enumerate(inputs, start=1):
            scale = epoch_window(acc, index, len(inputs))
            with acc.accumulate(model):
                acc.backward(model(x).sum() * scale)
                if acc.sync_gradients:
                    synced.append((epoch, index))
                    grads.append(model.weight.grad.clone())
                    model.weight.grad = None
    assert synced == [(0, 4), (0, 8), (0, 10), (1, 4), (1, 8), (1, 10)]
    # d(w·x)/dw = x: each step's gradient is the mean of its window's inputs, 4 of them or the last 2.
    for grad, window in zip(grads, [inputs[0:4], inputs[4:8], inputs[8:10]] * 2):
        torch.testing.assert_close(grad[0], window.mean(0))


@pytest.mark.slow
def test_one_epoch_with_accumulation_sees_each_image_once_in_the_planned_steps(tmp_path, tiny_model_dir, capsys):
    images = tmp_path / "images"
    for i in range(10):
        make_image(images / f"{i}.png", 128, 128, color=(20 * i, 200, 40))
        (images / f"{i}.txt").write_text(f"a green square number {i}", encoding="utf-8")
    cfg = load_config(write_config(tmp_path, tiny_model_dir, images, every=100),
                      ["training.batch_size=1", "training.gradient_accumulation_steps=4", "training.max_epochs=1"])
    result = train(cfg, progress=False)
    state = json.loads((result.checkpoint / "train_state.json").read_text())
    assert state["images_seen"] == 10  # 4 + 4 + 2, not 12 (a window running into the next epoch)
    plan = run_plan(load_manifest(cfg.output.manifest_dir), cfg.dataset, cfg.training)
    assert result.step == plan.total_steps == cfg.training.steps_for_epochs(plan.batches_per_epoch) == 3
    assert len(result.losses) == 3
    assert plan.text() in capsys.readouterr().out  # the start prints the plan `dataset inspect` prints
