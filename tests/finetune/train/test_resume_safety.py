"""Runs that survive anything: kill -9 inside a save, and a full disk, then --resume finishes bitwise equal."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap

import pytest
import torch

from trainer_runs import adapter_tensors, write_config
from finetune.train import checkpoint as ckpt
from finetune.config import load_config
from finetune.errors import CheckpointError
from finetune.train.recipe import train

pytestmark = pytest.mark.slow

STEPS, EVERY = 6, 2


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, shapes_folder) -> dict:
    folder = tmp_path_factory.mktemp("whole")
    return adapter_tensors(train(load_config(write_config(folder, tiny_model_dir, shapes_folder, STEPS, EVERY)),
                                 progress=False).output_path)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# Each kill point is inside the save of step 4: the first after the Accelerate state is written but
# before the adapter file, the second after every file is written and synced but before the rename.
KILL_POINTS = {
    "before_weights": ("finetune.train.outputs", "save_trained_weights"),
    "before_rename": ("finetune.train.checkpoint", "fsync_tree"),
}

KILLER = """
import os, signal, sys, importlib
from pathlib import Path
module = importlib.import_module({module!r})
real = getattr(module, {name!r})

def die_in_step_4(path, *args, **kwargs):
    if ".step-000004.tmp" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, *args, **kwargs)

setattr(module, {name!r}, die_in_step_4)
from finetune.config import load_config
from finetune.train.recipe import train
train(load_config(sys.argv[1]), progress=False)
"""


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_kill_9_inside_a_save_then_resume_is_bitwise_equal(tmp_path, tiny_model_dir, shapes_folder, uninterrupted, point):
    path = write_config(tmp_path, tiny_model_dir, shapes_folder, STEPS, EVERY)
    module, name = KILL_POINTS[point]
    script = textwrap.dedent(KILLER.format(module=module, name=name))
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stdout[-2000:] + done.stderr[-2000:]
    root = tmp_path / "out" / "checkpoints"
    assert [step for step, _ in ckpt.list_checkpoints(root)] == [2]  # the half-written step 4 never counts
    assert ckpt.latest_checkpoint(root).name == "step-000002"

    resumed = train(load_config(path), resume="latest", progress=False)
    assert resumed.step == STEPS
    assert_same(adapter_tensors(resumed.output_path), uninterrupted)
    assert not list(root.glob(".step-*.tmp"))  # the next save cleans the stale temp folder


def test_disk_full_during_a_save_keeps_the_last_checkpoint_and_resume_finishes(
        tmp_path, tiny_model_dir, shapes_folder, uninterrupted, monkeypatch):
    path = write_config(tmp_path, tiny_model_dir, shapes_folder, STEPS, EVERY)
    real = ckpt.fsync_tree

    def full_disk_at_step_4(folder):
        if folder.name == ".step-000004.tmp":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(folder)

    monkeypatch.setattr(ckpt, "fsync_tree", full_disk_at_step_4)
    with pytest.raises(CheckpointError) as info:
        train(load_config(path), progress=False)
    root = tmp_path / "out" / "checkpoints"
    assert "disk full while saving step 4" in str(info.value) and str(root) in str(info.value)
    assert "GiB free" in str(info.value)
    assert not (root / ".step-000004.tmp").exists()  # the partial checkpoint was removed
    assert ckpt.latest_checkpoint(root).name == "step-000002"

    monkeypatch.setattr(ckpt, "fsync_tree", real)  # space freed
    resumed = train(load_config(path), resume="latest", progress=False)
    assert resumed.step == STEPS
    assert_same(adapter_tensors(resumed.output_path), uninterrupted)
