"""A run remembers the --set overrides it was started with; --resume applies them again, once."""

from __future__ import annotations

import json
import shlex

import pytest

from finetune.config import load_config
from finetune.errors import ConfigError
from finetune.train.command import config_for_resume, record_run, resume_hint, run_config_of

TOML = """
[model]
pretrained = "m"
[dataset]
[[dataset.subsets]]
folder = "i"
[training]
max_steps = 1000
"""


def _config(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "i").mkdir()
    path = tmp_path / "c.toml"
    path.write_text(TOML, encoding="utf-8")
    return path


def test_resume_applies_the_runs_overrides_and_new_ones_win(tmp_path):
    path = _config(tmp_path)
    overrides = ["training.max_steps=12", "training.learning_rate=3e-4"]
    record_run(load_config(path, overrides), path, overrides)
    cfg, applied = config_for_resume(path, [])
    assert cfg.training.max_steps == 12 and cfg.training.learning_rate == 3e-4
    cfg, applied = config_for_resume(path, ["training.max_steps=20"])
    assert cfg.training.max_steps == 20 and cfg.training.learning_rate == 3e-4
    assert applied == ["training.learning_rate=3e-4", "training.max_steps=20"]


def test_without_a_record_resume_reads_the_toml_alone(tmp_path):
    cfg, applied = config_for_resume(_config(tmp_path), [])
    assert cfg.training.max_steps == 1000 and applied == []


def test_the_hint_quotes_every_override_and_from_the_run_needs_none(tmp_path):
    path = _config(tmp_path)
    overrides = ["output.dir=a b", "sample.prompts=['a dog']"]
    cfg = load_config(path, overrides)
    hint = resume_hint(path, cfg, overrides, ["training.max_steps=9"])
    assert shlex.split(hint) == ["finetune", "train", str(path), "--resume", "--set", f'output.dir="{tmp_path / "a b"}"',
                                 "--set", 'sample.prompts=["a dog"]', "--set", "training.max_steps=9"]
    record_run(cfg, path, overrides)
    resolved = tmp_path / "a b" / "config.resolved.toml"
    again = load_config(resolved)
    assert shlex.split(resume_hint(resolved, again, overrides)) == ["finetune", "train", "--resume", str(tmp_path / "a b")]


def test_overrides_are_recorded_resolved_and_never_applied_twice(tmp_path):
    path = _config(tmp_path)
    overrides = ["output.dir=ui_run", "training.max_steps=12"]
    cfg = load_config(path, overrides)
    record_run(cfg, path, overrides)
    run = tmp_path / "ui_run"
    record = json.loads((run / "run.json").read_text())
    assert record["overrides"] == [f'output.dir="{run}"', "training.max_steps=12"]
    assert load_config(run / "config.resolved.toml") == cfg  # the resolved config is the run's config
    # Every entry finds the same run: the TOML with the printed overrides, the resolved config, the folder.
    for config, again in [(path, ["output.dir=ui_run"]), (run / "config.resolved.toml", []),
                          (run_config_of(str(run))[0], [])]:
        resumed, applied = config_for_resume(config, again)
        assert resumed.output.dir == run and resumed.training.max_steps == 12, config


def test_a_run_recorded_with_a_relative_override_resumes_from_its_resolved_config(tmp_path):
    """run.json written before overrides were recorded resolved: the resolved config must not re-apply them."""
    path = _config(tmp_path)
    cfg = load_config(path, ["output.dir=ui_run"])
    record_run(cfg, path, [])
    (tmp_path / "ui_run" / "run.json").write_text(json.dumps({"config": str(path), "overrides": ["output.dir=ui_run"]}))
    resumed, _ = config_for_resume(tmp_path / "ui_run" / "config.resolved.toml", [])
    assert resumed.output.dir == tmp_path / "ui_run"  # not ui_run/ui_run


def test_a_resume_keeps_the_toml_the_run_started_from(tmp_path):
    path = _config(tmp_path)
    cfg = load_config(path, ["training.max_steps=12"])
    record_run(cfg, path, ["training.max_steps=12"])
    resolved = tmp_path / "output" / "config.resolved.toml"
    resumed, applied = config_for_resume(resolved, ["training.max_steps=20"])
    record_run(resumed, resolved, applied)
    record = json.loads((tmp_path / "output" / "run.json").read_text())
    assert record == {"config": str(path), "overrides": ["training.max_steps=20"]}
    assert config_for_resume(path, [])[0].training.max_steps == 20  # the TOML entry agrees


def test_resume_by_run_folder_or_checkpoint_folder(tmp_path):
    path = _config(tmp_path)
    record_run(load_config(path), path, [])
    run = tmp_path / "output"
    assert run_config_of(str(run)) == (run / "config.resolved.toml", "latest")
    step = run / "checkpoints" / "step-000004"
    step.mkdir(parents=True)
    assert run_config_of(str(step)) == (run / "config.resolved.toml", str(step))
    with pytest.raises(ConfigError, match="finetune train CONFIG --resume"):
        run_config_of(str(tmp_path / "i"))


def test_a_run_resumed_from_python_without_a_command_keeps_run_json(tmp_path):
    path = _config(tmp_path)
    cfg = load_config(path, ["training.max_steps=12"])
    record_run(cfg, path, ["training.max_steps=12"])
    before = (tmp_path / "output" / "run.json").read_text()
    record_run(cfg, None, [])  # train(cfg, resume="latest") called from Python
    assert (tmp_path / "output" / "run.json").read_text() == before
