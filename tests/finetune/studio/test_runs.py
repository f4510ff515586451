"""Run state read from a run folder: status.json, a dead pid, inference from files, metrics, ETA, log tail."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from finetune.studio import runs
from finetune.studio.paths import Workspace


def _status(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    data = {"state": "running", "step": 3, "max_steps": 10, "pid": os.getpid(), "error": None, "updated": 1.0}
    (folder / "status.json").write_text(json.dumps({**data, **fields}))


def _checkpoint(folder, step):
    ckpt = folder / "checkpoints" / f"step-{step:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / "train_state.json").write_text("{}")


def test_status_file_states(tmp_path):
    _status(tmp_path / "a")
    assert runs.run_state(tmp_path / "a").describe() == "running, step 3/10"
    _status(tmp_path / "b", state="stopped", step=5)
    assert runs.run_state(tmp_path / "b").describe() == "stopped at step 5/10"
    _status(tmp_path / "c", state="failed", error="error: out of GPU memory")
    assert "out of GPU memory" in runs.run_state(tmp_path / "c").describe()


def test_running_status_with_a_dead_pid_is_killed_with_the_log_tail(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = tmp_path / "run"
    _status(folder, pid=int(done.stdout))
    (folder / "logs").mkdir()
    (folder / "logs" / "console.log").write_text("step 3\nRuntimeError: CUDA error: an illegal memory access\n")
    state = runs.run_state(folder)
    assert state.state == "killed"
    assert "illegal memory access" in state.error


def test_without_status_the_files_tell(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.resolved.toml").write_text("[training]\nmax_steps = 8\n")
    assert runs.run_state(folder).state == "not started"
    _checkpoint(folder, 4)
    assert runs.run_state(folder).describe() == "stopped at step 4/8"
    _checkpoint(folder, 8)
    (folder / "lora.safetensors").write_bytes(b"x")
    assert runs.run_state(folder).describe() == "finished, 8 steps"


def test_metrics_skip_a_half_written_line_and_give_an_eta(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-4, "images_per_s": 2.0, "epoch": 0, "time": 100.0 + s})
             for s in range(1, 6)]
    (logs / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "lo')
    metrics = runs.read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert runs.eta_seconds(metrics, 10) == 5.0  # one second a step, five to go
    assert runs.eta_seconds(metrics[:1], 10) is None


def test_log_tail_keeps_the_last_state_of_a_progress_bar(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "console.log").write_bytes(b"start\ntrain: 1/4\rtrain: 2/4\rtrain: 3/4\nerror: disk full\n")
    assert runs.log_tail(tmp_path) == "start\ntrain: 3/4\nerror: disk full"
    assert runs.error_line(tmp_path) == "error: disk full"


def test_samples_sorted_by_step_and_runs_listed(tmp_path):
    run = tmp_path / "runs" / "a"
    (run / "samples").mkdir(parents=True)
    for step in (10, 2):
        (run / "samples" / f"step-{step:06d}.png").write_bytes(b"")
    (run / "config.resolved.toml").write_text("")
    (tmp_path / "not-a-run").mkdir()
    assert [s for _, s in runs.samples(run)] == [2, 10]
    assert runs.list_runs(Workspace(tmp_path)) == [run]


def test_train_argv_is_the_ordinary_cli_without_a_shell(tmp_path):
    argv = runs.train_argv(tmp_path / "my config.toml", ["training.max_steps=4"])
    assert argv == [sys.executable, "-m", "finetune", "train", str(tmp_path / "my config.toml"),
                    "--set", "training.max_steps=4"]
    assert runs.resume_argv(tmp_path / "run") == [sys.executable, "-m", "finetune", "train", "--resume",
                                                  str(tmp_path / "run")]


def test_a_running_status_takes_its_step_from_the_newer_metrics(tmp_path):
    _status(tmp_path, step=0)  # written at start; the trainer rewrites it when the state changes
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 7, "loss": 0.9}\n')
    assert runs.run_state(tmp_path).describe() == "running, step 7/10"


def test_start_refuses_paths_outside_and_a_fresh_start_over_checkpoints(tmp_path):
    import pytest

    from finetune.errors import CheckpointError, ConfigError
    from finetune.studio.paths import PathRefused

    root = tmp_path / "ws"
    for folder in ("model", "images", "out"):
        (root / folder).mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "train.toml").write_text('[model]\npretrained = "model"\n[[dataset.subsets]]\nfolder = "images"\n'
                                     '[output]\ndir = "out"\n', encoding="utf-8")
    ws = Workspace(root)
    with pytest.raises(PathRefused, match="output.dir"):
        runs.start_run(ws, "train.toml", overrides=[f'output.dir="{tmp_path / "outside"}"'])
    _checkpoint(root / "out", 2)
    with pytest.raises(CheckpointError, match="--resume"):
        runs.start_run(ws, "train.toml")
    assert not (root / "out" / "logs").exists()  # refused before any process or file
    with pytest.raises(ConfigError, match="is inside the image folder"):
        runs.start_run(ws, "train.toml", overrides=['output.dir="images/run"'])
    assert os.listdir(root / "images") == []  # no run folder, no console.log among the images
