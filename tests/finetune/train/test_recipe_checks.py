"""train()'s first checks: they refuse before anything is scanned, cached or written."""

from __future__ import annotations

import pytest

from trainer_runs import write_config
from finetune.config import load_config
from finetune.errors import ConfigError
from finetune.train.recipe import train


def listing(folder) -> list[tuple[str, int]]:
    return sorted((str(p), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_an_output_dir_inside_the_images_is_refused_and_the_images_are_untouched(tmp_path, shapes_folder):
    (tmp_path / "model").mkdir()
    before = listing(shapes_folder)
    cfg = load_config(write_config(tmp_path, tmp_path / "model", shapes_folder), [f"output.dir={shapes_folder}/run"])
    with pytest.raises(ConfigError, match=f"output.dir = {shapes_folder / 'run'} is inside the image folder"):
        train(cfg, progress=False)
    assert listing(shapes_folder) == before

