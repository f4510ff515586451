"""`finetune train --dry-run`: the run's checks, plan, effective config and memory estimate; nothing written."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from finetune.cli import main
from trainer_runs import write_config


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its sha256 (and every folder): byte-identical means equal snapshots."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def test_dry_run_checks_and_plans_a_new_run_and_writes_nothing(tmp_path, tiny_model_dir, shapes_folder, capsys):
    config = write_config(tmp_path, tiny_model_dir, shapes_folder)
    config.write_text(config.read_text(encoding="utf-8").replace("[training]\n", '[training]\nmax_epochs = 2\n'),
                      encoding="utf-8")
    before = snapshot(tmp_path)
    assert main(["train", str(config), "--dry-run", "--gpu-memory", "8"]) == 0
    out = capsys.readouterr().out
    assert "(base; input channels checked, no weights read)" in out and "bucket (h x w)" in out
    assert "plan: " in out and "training.max_epochs = 2:" in out
    assert "effective config" in out and "[training]" in out and "max_epochs = 2" in out
    assert "estimated peak GPU memory:" in out and "on a 8 GiB GPU" in out
    assert not (tmp_path / "out").exists() and snapshot(tmp_path) == before


def test_dry_run_stops_at_the_first_failing_check_in_the_runs_order(tmp_path, tiny_model_dir, shapes_folder, capsys):
    # The model is checked before the dataset is scanned: an empty image folder is not reached.
    config = write_config(tmp_path, tiny_model_dir, tmp_path / "no-images")
    (tmp_path / "no-images").mkdir()
    broken = tmp_path / "model"
    broken.mkdir()
    config.write_text(config.read_text(encoding="utf-8").replace(str(tiny_model_dir), str(broken)), encoding="utf-8")
    assert main(["train", str(config), "--dry-run"]) == 2
    assert str(broken) in capsys.readouterr().err
    # Model fine, no usable image: the dataset scan refuses, naming the folder.
    config = write_config(tmp_path, tiny_model_dir, tmp_path / "no-images")
    assert main(["train", str(config), "--dry-run"]) == 2
    assert "no-images" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_resume_of_a_finished_epochs_run_and_dry_runs_of_its_resume(tmp_path, tiny_model_dir, shapes_folder, capsys):
    config = write_config(tmp_path, tiny_model_dir, shapes_folder, every=100)
    assert main(["train", str(config), "--set", "training.max_epochs=1"]) == 0
    run = tmp_path / "out"
    before = snapshot(run)
    capsys.readouterr()
    # A finished max_epochs run says so and does nothing (its checkpoint's config holds its steps).
    assert main(["train", str(config), "--resume"]) == 0
    assert "finished already" in capsys.readouterr().out and snapshot(run) == before
    assert main(["train", str(config), "--resume", "--dry-run"]) == 0
    assert "finished already" in capsys.readouterr().out and snapshot(run) == before
    # A longer run can continue it: the checks pass and the plan is printed; the run folder is byte-identical.
    assert main(["train", str(config), "--resume", "--dry-run", "--set", "training.max_epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "can be continued" in out and "plan: " in out and "max_epochs = 3" in out
    assert snapshot(run) == before
    # A frozen setting changed: refused as the run refuses it, still nothing written.
    assert main(["train", str(config), "--resume", "--dry-run", "--set", "training.max_epochs=3",
                 "--set", "training.learning_rate=0.5"]) == 2
    assert "cannot resume" in capsys.readouterr().err and snapshot(run) == before
