"""A run remembers the --set overrides it was started with; --resume applies them again."""

from __future__ import annotations

import shlex

from finetune.train.command import config_for_resume, record_command, resume_hint

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
    record_command(tmp_path / "output", path, ["training.max_steps=12", "training.learning_rate=3e-4"])
    cfg, applied = config_for_resume(path, [])
    assert cfg.training.max_steps == 12 and cfg.training.learning_rate == 3e-4
    cfg, applied = config_for_resume(path, ["training.max_steps=20"])
    assert cfg.training.max_steps == 20 and cfg.training.learning_rate == 3e-4
    assert applied == ["training.learning_rate=3e-4", "training.max_steps=20"]


def test_without_a_record_resume_reads_the_toml_alone(tmp_path):
    cfg, applied = config_for_resume(_config(tmp_path), [])
    assert cfg.training.max_steps == 1000 and applied == []


def test_the_hint_quotes_every_override(tmp_path):
    hint = resume_hint(tmp_path / "my config.toml", ["output.dir=/runs/a b", "sample.prompts=['a dog']"])
    assert shlex.split(hint) == ["finetune", "train", str(tmp_path / "my config.toml"), "--resume",
                                 "--set", "output.dir=/runs/a b", "--set", "sample.prompts=['a dog']"]
