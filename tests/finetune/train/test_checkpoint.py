"""Checkpoint folders: complete or absent, `latest` last, pruning, disk-full, resume refusals."""

from __future__ import annotations

import errno

import pytest
import torch

from finetune.train import checkpoint as ckpt
from finetune.train.resume import resume_conflicts
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


def test_prune_can_keep_each_pruned_checkpoints_weights_beside_the_checkpoints(accelerator, tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save(accelerator, root, step, write=lambda folder: (folder / "lora.safetensors").write_bytes(folder.name.encode()))
    ckpt.prune_checkpoints(root, keep_last=1, keep_weights="lora.safetensors")
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [3]
    kept = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert kept == ["lora-step-000001.safetensors", "lora-step-000002.safetensors"]
    assert (tmp_path / "lora-step-000002.safetensors").read_bytes() == b".step-000002.tmp"  # the file it held


def test_a_fresh_start_is_refused_where_an_earlier_run_left_checkpoints(accelerator, tmp_path):
    from finetune.train.checkpoint import check_fresh_start

    check_fresh_start(tmp_path / "checkpoints")  # no folder yet
    (tmp_path / "checkpoints" / ".step-000003.tmp").mkdir(parents=True)
    check_fresh_start(tmp_path / "checkpoints")  # a half-written folder is no run to protect
    save(accelerator, tmp_path / "checkpoints", 4)
    with pytest.raises(CheckpointError, match=r"latest: step-000004.*--resume.*another output.dir"):
        check_fresh_start(tmp_path / "checkpoints")


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
    conflicts = resume_conflicts(saved, current)
    assert any(c.startswith("model.pretrained") for c in conflicts)
    assert any(c.startswith("lora.rank") for c in conflicts)
    assert not any("max_steps" in c for c in conflicts)  # more steps is a fine reason to resume


def test_a_checkpoint_older_than_a_key_resumes_while_the_key_keeps_its_default():
    saved = {"training": {"method": "full", "learning_rate": 1e-5}}  # written before fused_backward existed
    current = {"training": {"method": "full", "learning_rate": 1e-5, "block_lr_scale": {}},
               "memory": {"fused_backward": False, "weight_dtype": "fp32"}}
    assert resume_conflicts(saved, current) == []
    current["training"].update(learning_rate=2e-5)
    current["memory"].update(fused_backward=True)
    conflicts = resume_conflicts(saved, current)
    assert any(c.startswith("memory.fused_backward: None in the checkpoint, True now") for c in conflicts)
    assert any(c.startswith("training.learning_rate") for c in conflicts)  # the scheduler would keep the old one


def test_a_subset_key_newer_than_the_checkpoint_resumes_and_subset_changes_are_named():
    saved = {"dataset": {"subsets": [{"folder": "/a", "repeats": 1}, {"folder": "/b", "repeats": 2}]}}
    current = {"dataset": {"subsets": [{"folder": "/a", "repeats": 1, "kohya_repeats": False},
                                       {"folder": "/b", "repeats": 2, "kohya_repeats": False}]}}
    assert resume_conflicts(saved, current) == []  # a checkpoint from before kohya_repeats existed
    current["dataset"]["subsets"][1].update(repeats=3, kohya_repeats=True)
    assert resume_conflicts(saved, current) == ["dataset.subsets.1.kohya_repeats: None in the checkpoint, True now",
                                                     "dataset.subsets.1.repeats: 2 in the checkpoint, 3 now"]
    current["dataset"]["subsets"].pop()
    assert [c.split(":")[0] for c in resume_conflicts(saved, current)] == ["dataset.subsets"]


def test_trainable_weights_are_saved_by_their_bare_names_through_torch_compile(tmp_path):
    from accelerate import Accelerator

    def model():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
        net[0].requires_grad_(False)
        return net

    acc = Accelerator(cpu=True)
    ckpt.register_trainable_only_hooks(acc)
    compiled = acc.prepare(torch.compile(model()))  # wrapped only: nothing is compiled without a forward
    with torch.no_grad():
        compiled._orig_mod[1].weight.fill_(0.5)
    acc.save_state(str(tmp_path / "state"))
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "state" / "trainable_0.safetensors"))) == {"1.weight", "1.bias"}

    eager_acc = Accelerator(cpu=True)
    ckpt.register_trainable_only_hooks(eager_acc)
    eager = eager_acc.prepare(model())  # resumed without compile: the same names
    eager_acc.load_state(str(tmp_path / "state"))
    assert torch.equal(eager[1].weight, torch.full((1, 3), 0.5))


def test_a_checkpoint_from_before_the_memory_table_compares_its_keys_in_their_new_place():
    from finetune.config import migrate_moved_keys

    saved = migrate_moved_keys({"training": {"method": "lora", "base_dtype": "bf16", "memory_profile": "low_vram"}})
    assert saved == {"training": {"method": "lora"}, "memory": {"base_dtype": "bf16", "profile": "low_vram"}}
    current = {"training": {"method": "lora"}, "memory": {"base_dtype": "fp32", "profile": "low_vram"}}
    assert resume_conflicts(saved, current) == ["memory.base_dtype: 'bf16' in the checkpoint, 'fp32' now"]


def test_the_keys_frozen_on_resume_are_the_ones_marked_on_the_schema():
    from finetune.config import frozen_keys

    keys = frozen_keys()
    for key in ("model", "dataset", "lora", "loss", "training.learning_rate", "optimizer.scheduler",
                "memory.base_dtype", "cache.latent_std"):
        assert key in keys
    for key in ("training.max_steps", "training.max_epochs", "checkpoint", "sample", "logging",
                "checkpoint.every_n_steps", "sample.prompts"):
        assert key not in keys
