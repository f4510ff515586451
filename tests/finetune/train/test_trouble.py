"""When a run goes wrong: NaN/inf losses and out of memory keep the work, and the advice ends with a
command that the toolkit runs exactly as printed."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from trainer_runs import adapter_tensors, write_config
from finetune.cli import main
from finetune.config import load_config
from finetune.errors import FinetuneError
from finetune.train.recipe import Recipe, train
from finetune.train.step import diffusion_step_loss
from finetune.train.trouble import finite_checkpoint

pytestmark = pytest.mark.slow


def failing_from(call: int, error=None, until: int | None = None):
    """A step loss that is NaN (or raises `error`) on micro-steps `call`..`until` (1-based), real otherwise."""
    calls = []

    def step_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) >= call and (until is None or len(calls) <= until):
            if error is not None:
                raise error
            return diffusion_step_loss(*args, **kwargs) * float("nan")
        return diffusion_step_loss(*args, **kwargs)
    return step_loss


def printed_command(message: str, index: int = -1) -> list[str]:
    """The `finetune train ...` line of a message, as argv for `finetune.cli.main`."""
    lines = [line.strip() for line in message.splitlines() if line.strip().startswith("finetune train ")]
    words = shlex.split(lines[index])
    assert words[:2] == ["finetune", "train"]
    return words[1:]


def test_nan_stop_names_the_last_finite_checkpoint_and_its_command_resumes(tmp_path, tiny_model_dir, shapes_folder):
    cfg = load_config(write_config(tmp_path, tiny_model_dir, shapes_folder, steps=6, every=2),
                      ["training.max_nan_steps=2"])
    with pytest.raises(FinetuneError) as info:
        train(cfg, progress=False, step_loss=failing_from(4))  # steps 1-3 train, then every loss is NaN
    message = str(info.value)
    good = cfg.output.dir / "checkpoints" / "step-000002"
    assert "NaN/inf 2 steps in a row at step 3" in message and str(good) in message
    assert "bf16" not in message  # an fp32 run gets no precision advice
    argv = printed_command(message)
    assert "--allow-changes" in argv and "training.learning_rate=2e-4" in argv
    assert main(argv) == 0
    assert load_config(cfg.output.dir / "config.resolved.toml").training.learning_rate == 2e-4
    assert adapter_tensors(cfg.output.adapter_path)


def test_nan_before_any_checkpoint_starts_again_and_skips_are_logged(tmp_path, tiny_model_dir, shapes_folder):
    cfg = load_config(write_config(tmp_path, tiny_model_dir, shapes_folder, steps=4, every=10),
                      ["training.max_nan_steps=2", "logging.every_n_steps=1"])
    with pytest.raises(FinetuneError) as info:
        train(cfg, progress=False, step_loss=failing_from(1))
    message = str(info.value)
    assert "No checkpoint was saved yet" in message
    assert not (cfg.output.dir / "checkpoints").exists() or not list((cfg.output.dir / "checkpoints").iterdir())
    assert main(printed_command(message)) == 0

    # One skipped step in the middle of a run: the logged steps after it say so.
    (tmp_path / "b").mkdir()
    other = load_config(write_config(tmp_path / "b", tiny_model_dir, shapes_folder, steps=4, every=10),
                        ["training.max_nan_steps=3", "logging.every_n_steps=1"])
    train(other, progress=False, step_loss=failing_from(2, until=2))
    lines = [json.loads(line) for line in (other.output.dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0].get("nan_skipped") is None and lines[-1]["nan_skipped"] == 1


def test_finite_checkpoint_skips_checkpoints_with_non_finite_weights(tmp_path):
    from safetensors.torch import save_file

    from finetune.train.checkpoint import STATE_FILE

    for step, value in [(2, 1.0), (4, float("nan")), (6, 1.0)]:
        folder = tmp_path / f"step-{step:06d}"
        folder.mkdir()
        save_file({"w": torch.full((2,), value)}, str(folder / "lora.safetensors"))
        (folder / STATE_FILE).write_text("{}")
    assert finite_checkpoint(tmp_path, before_step=5).name == "step-000002"  # step 4 holds NaN
    assert finite_checkpoint(tmp_path, before_step=6).name == "step-000006"
    assert finite_checkpoint(tmp_path, before_step=1) is None


def test_out_of_memory_in_a_step_saves_the_last_step_and_its_command_resumes_bitwise(
        tmp_path, tiny_model_dir, shapes_folder):
    (tmp_path / "whole").mkdir()
    uninterrupted = load_config(write_config(tmp_path / "whole", tiny_model_dir, shapes_folder, steps=4, every=10))
    whole = adapter_tensors(train(uninterrupted, progress=False).output_path)
    cfg = load_config(write_config(tmp_path, tiny_model_dir, shapes_folder, steps=4, every=10))
    with pytest.raises(FinetuneError) as info:
        train(cfg, progress=False, step_loss=failing_from(3, error=torch.OutOfMemoryError("CUDA out of memory")))
    message = str(info.value)
    saved = cfg.output.dir / "checkpoints" / "step-000002"
    assert saved.is_dir() and str(saved) in message  # the step the out-of-memory step never finished
    first, halved = printed_command(message, 0), printed_command(message, 1)
    assert "memory.gradient_checkpointing=true" in first and "--allow-changes" not in first
    assert "training.batch_size=1" in halved and "training.gradient_accumulation_steps=2" in halved
    assert "--allow-changes" in halved
    assert main(first) == 0  # gradient checkpointing changes memory, not the math
    resumed = adapter_tensors(cfg.output.adapter_path)
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_a_step_due_a_checkpoint_and_samples_saves_the_checkpoint_first(tmp_path, tiny_model_dir, shapes_folder,
                                                                        monkeypatch):
    def no_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(Recipe, "render_samples", no_memory)
    cfg = load_config(write_config(tmp_path, tiny_model_dir, shapes_folder, steps=6, every=2,
                                   extra='[sample]\nprompts = ["a red drawing"]\nevery_n_steps = 2\n'))
    with pytest.raises(FinetuneError) as info:
        train(cfg, progress=False)
    assert (cfg.output.dir / "checkpoints" / "step-000002").is_dir()
    assert str(cfg.output.dir / "checkpoints" / "step-000002") in str(info.value)


def test_extending_a_finished_cosine_run_says_and_records_the_new_schedule(tmp_path, tiny_model_dir, shapes_folder,
                                                                          capsys):
    from safetensors import safe_open

    path = write_config(tmp_path, tiny_model_dir, shapes_folder, steps=4, every=2,
                        extra='[optimizer]\nscheduler = "cosine"\n')
    assert main(["train", str(path)]) == 0
    assert main(["train", str(path), "--resume", "--set", "training.max_steps=8"]) == 0
    said = capsys.readouterr().out
    assert "the cosine schedule is recomputed over 8 steps; the learning rate at step 5 is" in said
    with safe_open(str(tmp_path / "out" / "lora.safetensors"), framework="pt") as fh:
        changes = json.loads(fh.metadata()["finetune.changed_on_resume"])
    assert any("training.max_steps: 4 in the checkpoint, 8 now" in change for change in changes)
