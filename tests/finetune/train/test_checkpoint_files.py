"""A real tiny run's checkpoints: no pickle in them, `files.json` catches every kind of damage to every
file, resume falls back to the previous intact checkpoint (and ends bitwise equal), never a traceback."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import tomllib
from pathlib import Path

import pytest
import torch

from trainer_runs import adapter_tensors, write_config
from finetune import cli
from finetune.config import load_config
from finetune.errors import CheckpointError
from finetune.train import checkpoint as ckpt
from finetune.train.resume import resume_point
from finetune.train.recipe import train

STEPS = 3  # one checkpoint per step: step-000001 .. step-000003
FILES = ["config.toml", "files.json", "lora.safetensors", "rng_0.json", "rng_0.safetensors", "train_state.json",
         "trainable_0.safetensors", "training_state.json", "training_state.safetensors"]
DAMAGE = {
    "missing": lambda path: path.unlink(),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2]),
    "emptied": lambda path: path.write_bytes(b""),
    "garbled": lambda path: path.write_bytes(bytes(b ^ 0x5A for b in path.read_bytes())),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, shapes_folder) -> Path:
    """A finished 3-step run, checkpoints at every step; copy it before changing anything."""
    folder = tmp_path_factory.mktemp("run")
    train(load_config(write_config(folder, tiny_model_dir, shapes_folder, STEPS, every=1)), progress=False)
    return folder


def copy_of(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_a_checkpoint_holds_no_pickle(run):
    folder = run / "out" / "checkpoints" / "step-000003"
    assert sorted(p.name for p in folder.iterdir()) == FILES  # the list the damage tests walk
    for path in folder.iterdir():
        data = path.read_bytes()
        assert data[:2] not in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") and data[:4] != b"PK\x03\x04"
        if path.suffix == ".safetensors":  # an 8-byte header length, then the JSON header
            header = int.from_bytes(data[:8], "little")
            assert data[8:9] == b"{" and isinstance(json.loads(data[8:8 + header]), dict), path
        elif path.suffix == ".json":
            json.loads(data)
        else:
            assert path.suffix == ".toml", path
            tomllib.loads(data.decode())
    listed = json.loads((folder / "files.json").read_text())["files"]
    assert sorted(listed) == sorted(set(FILES) - {"files.json"})  # the completion marker is listed too
    assert all(listed[name]["size"] == (folder / name).stat().st_size for name in listed)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("name", FILES)
def test_a_damaged_file_falls_back_to_the_previous_checkpoint(run, tmp_path, name, damage):
    root = copy_of(run, tmp_path) / "out" / "checkpoints"
    DAMAGE[damage](root / "step-000003" / name)
    before = snapshot(root.parent.parent)
    folder, notes = ckpt.resume_candidate(root)
    assert folder == root / "step-000002"
    if not (name == "train_state.json" and damage == "missing"):  # else an unfinished save: not damage
        assert notes[0].startswith(f"{root / 'step-000003'} is damaged, skipped:") and name in notes[0]
        assert notes[-1] == f"resuming from {folder}, the newest intact checkpoint"
    with pytest.raises(CheckpointError, match=name):  # named explicitly, it is refused, with the file
        resume_point(root, str(root / "step-000003"))
    assert snapshot(root.parent.parent) == before  # nothing in the run folder was touched


def test_with_no_intact_checkpoint_the_cli_names_every_damaged_file(run, tmp_path, capsys):
    base = copy_of(run, tmp_path)
    root = base / "out" / "checkpoints"
    for step in (1, 2, 3):
        DAMAGE["truncated"](root / f"step-00000{step}" / "training_state.safetensors")
    (base / "out" / "lora.safetensors").unlink()  # so the run is not finished
    assert cli.main(["train", str(base / "train.toml"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no intact checkpoint") and "Traceback" not in err
    for step in (1, 2, 3):
        assert f"step-00000{step}/training_state.safetensors" in err


@pytest.mark.parametrize("listed", [{"../../train.toml": {"size": 1}}, {"lora.safetensors": 7}])
def test_a_file_list_naming_files_elsewhere_or_malformed_counts_as_damage(run, tmp_path, listed):
    root = copy_of(run, tmp_path) / "out" / "checkpoints"
    manifest = root / "step-000003" / "files.json"
    manifest.write_text(json.dumps({"format": 1, "files": {**json.loads(manifest.read_text())["files"], **listed}}))
    folder, notes = ckpt.resume_candidate(root)
    assert folder == root / "step-000002" and "not a file of this checkpoint" in notes[0]


@pytest.mark.slow
def test_resume_after_falling_back_ends_bitwise_equal_to_the_uninterrupted_run(run, tmp_path):
    whole = adapter_tensors(run / "out" / "lora.safetensors")
    base = copy_of(run, tmp_path)
    root = base / "out" / "checkpoints"
    DAMAGE["garbled"](root / "step-000003" / "trainable_0.safetensors")
    (base / "out" / "lora.safetensors").unlink()  # so the run is not finished
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        resumed = train(load_config(base / "train.toml"), resume="latest", progress=False)
    assert "step-000003 is damaged" in printed.getvalue() and f"resumed from {root / 'step-000002'}" in printed.getvalue()
    again = adapter_tensors(resumed.output_path)
    assert again.keys() == whole.keys() and all(torch.equal(again[k], whole[k]) for k in whole)
    assert not ckpt.checkpoint_files.damaged_files(root / "step-000003")  # saved anew, whole
