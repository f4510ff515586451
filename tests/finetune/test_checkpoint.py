"""Checkpoint folders: complete or absent, `latest` last, pruning, disk-full, resume refusals."""

from __future__ import annotations

import errno

import pytest
import torch

from finetune import checkpoint as ckpt
from finetune.errors import CheckpointError


@pytest.fixture
def accelerator():
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    acc.prepare(model, optimizer)
    yield acc
    acc.free_memory()


def save(acc, root, step, write=lambda folder: (folder / "w.safetensors").write_bytes(b"x")):
    return ckpt.save_checkpoint(acc, root, ckpt.TrainState(step=step, seed=1), "a = 1\n", write)


def test_saved_checkpoint_is_complete_and_latest(accelerator, tmp_path):
    folder = save(accelerator, tmp_path, 5)
    assert folder.name == "step-000005"
    assert {p.name for p in folder.iterdir()} >= {"train_state.json", "config.toml", "w.safetensors"}
    assert (tmp_path / "latest").read_text() == "step-000005"
    assert ckpt.TrainState.from_file(folder / "train_state.json").step == 5
    assert not list(tmp_path.glob(".step-*"))


def test_half_written_folders_are_never_resumed(accelerator, tmp_path):
    save(accelerator, tmp_path, 5)
    (tmp_path / "step-000010").mkdir()  # killed before train_state.json was written
    (tmp_path / ".step-000015.tmp").mkdir()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [5]
    (tmp_path / "latest").write_text("step-000010")  # a pointer to an incomplete folder is ignored
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000005"


def test_prune_keeps_the_newest(accelerator, tmp_path):
    for step in (1, 2, 3, 4):
        save(accelerator, tmp_path, step)
    (tmp_path / ".step-000009.tmp").mkdir()
    removed = ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in removed] == ["step-000001", "step-000002"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]
    assert not list(tmp_path.glob(".step-*"))


def test_disk_full_removes_the_partial_checkpoint_and_keeps_the_previous(accelerator, tmp_path):
    save(accelerator, tmp_path, 5)

    def full_disk(folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointError) as info:
        save(accelerator, tmp_path, 10, write=full_disk)
    assert "disk full" in str(info.value) and "GiB free" in str(info.value) and "--resume" in str(info.value)
    assert not list(tmp_path.glob(".step-*"))
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000005"


def test_resume_conflicts_name_the_changed_keys():
    saved = {"model": {"pretrained": "/a"}, "training": {"method": "lora", "max_steps": 10}, "lora": {"rank": 4}}
    current = {"model": {"pretrained": "/b"}, "training": {"method": "lora", "max_steps": 99}, "lora": {"rank": 8}}
    conflicts = ckpt.resume_conflicts(saved, current)
    assert any(c.startswith("model.pretrained") for c in conflicts)
    assert any(c.startswith("lora.rank") for c in conflicts)
    assert not any("max_steps" in c for c in conflicts)  # more steps is a fine reason to resume
