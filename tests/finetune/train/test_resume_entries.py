"""One run record: every way to resume a run (the TOML with its overrides, the run's resolved config,
the run folder, the studio's Resume) continues the same run, started with relative `--set` overrides,
to the same bits; a refused resume leaves the run folder byte for byte as it was."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from trainer_runs import adapter_tensors, assert_resolved_is_the_runs, write_config
from finetune.cli import main
from finetune.config import load_config
from finetune.studio import runs
from finetune.studio.paths import Workspace
from finetune.train.checkpoint import latest_checkpoint
from finetune.train.resume import resume_point

pytestmark = pytest.mark.slow

STEPS = 4
RELATIVE = ["--set", "output.dir=runs/rel", "--set", f"training.max_steps={STEPS}"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def stop_at_step_2(run: Path) -> None:
    """Make a finished run look as if it was stopped after step 2's checkpoint."""
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS:06d}")
    (run / "checkpoints" / "latest").write_text("step-000002")
    (run / "lora.safetensors").unlink()


@pytest.fixture(scope="module", params=["base", "refiner"])
def stopped(request, tmp_path_factory, tiny_model_dir, tiny_refiner_dir, shapes_folder):
    """(workspace, config, run folder, a copy of the stopped run, the uninterrupted run's LoRA)."""
    ws = tmp_path_factory.mktemp(request.param)
    model = tiny_refiner_dir if request.param == "refiner" else tiny_model_dir
    images = shutil.copytree(shapes_folder, ws / "images")  # its own: a test changes a caption
    config = write_config(ws, model, images, steps=1000, every=2)
    assert main(["train", str(config), *RELATIVE]) == 0
    run = ws / "runs" / "rel"
    whole = adapter_tensors(run / "lora.safetensors")
    stop_at_step_2(run)
    backup = tmp_path_factory.mktemp(f"{request.param}-backup") / "rel"
    shutil.copytree(run, backup)
    return ws, config, run, backup, whole


def restart_from(backup: Path, run: Path) -> None:
    shutil.rmtree(run)
    shutil.copytree(backup, run)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_resolved_config_reloads_to_the_runs_config(stopped):
    ws, config, run, backup, _ = stopped
    restart_from(backup, run)
    assert_resolved_is_the_runs(run)
    saved = load_config(run / "config.resolved.toml")
    assert saved.output.dir == run  # the relative override, recorded resolved
    assert saved.training.max_steps == STEPS
    assert resume_point(run / "checkpoints", "latest").state.step == 2
    if "refiner" in str(ws):  # the refiner's own range, explicit: a reload keeps [0, 200)
        assert (saved.loss.min_timestep, saved.loss.max_timestep) == (0, 200)


@pytest.mark.parametrize("entry", ["toml", "resolved", "folder", "checkpoint"])
def test_every_cli_entry_resumes_to_the_uninterrupted_bits(stopped, entry):
    ws, config, run, backup, whole = stopped
    restart_from(backup, run)
    argv = {"toml": ["train", str(config), "--resume", "--set", "output.dir=runs/rel"],
            "resolved": ["train", str(run / "config.resolved.toml"), "--resume"],
            "folder": ["train", "--resume", str(run)],
            "checkpoint": ["train", "--resume", str(run / "checkpoints" / "step-000002")]}[entry]
    assert main(argv) == 0
    assert latest_checkpoint(run / "checkpoints").name == f"step-{STEPS:06d}"
    assert_same(adapter_tensors(run / "lora.safetensors"), whole)


def test_the_studio_resume_continues_the_run(stopped):
    ws, config, run, backup, whole = stopped
    if "refiner" in str(ws):
        pytest.skip("one studio process is enough: the CLI entries cover the refiner")
    restart_from(backup, run)
    out, pid = runs.resume_run(Workspace(ws.parent), run, settle_s=0)
    assert out == run
    assert runs._LAUNCHED[run.resolve()].wait(timeout=300) == 0, runs.log_tail(run)
    assert_same(adapter_tensors(run / "lora.safetensors"), whole)
    assert runs.run_state(run).state == "finished"


def test_a_refused_resume_changes_nothing_and_the_printed_command_still_resumes(stopped, capsys):
    ws, config, run, backup, whole = stopped
    restart_from(backup, run)
    before = snapshot(run)
    refused = ["train", str(config), "--resume", "--set", "output.dir=runs/rel", "--set", "training.learning_rate=5e-4"]
    assert main(refused) == 2
    assert "training.learning_rate" in capsys.readouterr().err
    assert snapshot(run) == before  # run.json, config.resolved.toml, manifest, checkpoints: byte for byte
    assert main(["train", "--resume", str(run)]) == 0  # what was recorded still resumes
    assert_same(adapter_tensors(run / "lora.safetensors"), whole)


def test_a_resume_refused_for_changed_data_leaves_the_manifest(stopped, capsys):
    ws, config, run, backup, _ = stopped
    restart_from(backup, run)
    before = snapshot(run)
    caption = ws / "images" / "0.txt"
    original = caption.read_text(encoding="utf-8")
    caption.write_text("another caption", encoding="utf-8")
    try:
        assert main(["train", "--resume", str(run)]) == 2
    finally:
        caption.write_text(original, encoding="utf-8")
    assert "the images, captions or crops changed" in capsys.readouterr().err
    assert snapshot(run) == before  # the new plan never replaced the run's manifest
    assert not (run / ".manifest-resume").exists()


def test_a_studio_resume_that_is_refused_shows_as_failed(stopped):
    ws, config, run, backup, _ = stopped
    if "refiner" in str(ws):
        pytest.skip("the studio's handling does not depend on the model")
    restart_from(backup, run)
    resolved = run / "config.resolved.toml"
    resolved.write_text(resolved.read_text().replace("learning_rate = 0.002", "learning_rate = 0.001"))
    with pytest.raises(runs.RunFailed, match="cannot resume"):
        runs.resume_run(Workspace(ws.parent), run, settle_s=300)
    assert runs.run_state(run).state == "failed"
