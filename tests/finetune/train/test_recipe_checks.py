"""train()'s first checks: they refuse before anything is scanned, cached or written."""

from __future__ import annotations

import json
import os

import pytest

from trainer_runs import write_config
from finetune.config import load_config
from finetune.errors import ConfigError, ModelError
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


def test_an_inpainting_unet_is_refused_before_the_dataset_scan(tmp_path, shapes_folder):
    (tmp_path / "model" / "unet").mkdir(parents=True)  # the check reads only unet/config.json
    (tmp_path / "model" / "unet" / "config.json").write_text(json.dumps({"in_channels": 9}), encoding="utf-8")
    cfg = load_config(write_config(tmp_path, tmp_path / "model", shapes_folder))
    with pytest.raises(ModelError, match="the UNet takes 9 input channels"):
        train(cfg, progress=False)
    assert not os.path.exists(cfg.output.dir)  # no manifest, no cache, no run folder
