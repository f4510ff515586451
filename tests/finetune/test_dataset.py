"""The config-to-manifest glue: report text, long-caption warning, the inspect command."""

from __future__ import annotations

import pytest

import subprocess
import sys

from conftest import make_image
from finetune.dataset import long_caption_warning


def test_long_captions_are_counted_in_clip_tokens():
    long = ", ".join(f"tag{i}" for i in range(60))
    warning = long_caption_warning(["a short caption", long, long])
    assert warning is not None and "2 of 3 captions" in warning and "75" in warning
    assert long_caption_warning(["a short caption"]) is None


@pytest.mark.slow
def test_inspect_prints_buckets_problems_and_totals(tmp_path):
    folder = tmp_path / "imgs"
    make_image(folder / "a.png", 200, 300)
    (folder / "b.jpg").write_text("nope")
    model = tmp_path / "model"
    model.mkdir()
    config = tmp_path / "c.toml"
    config.write_text('[model]\npretrained = "model"\n[dataset]\nresolution = 256\nmin_side = 128\n'
                      '[[dataset.subsets]]\nfolder = "imgs"\n', encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "finetune", "dataset", "inspect", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "bucket (h x w)" in done.stdout and "b.jpg: not an image" in done.stdout and "images: 1" in done.stdout
    # "changes nothing": no output folder, and the image folder is as it was.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml", "imgs", "model"]
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "b.jpg"]


@pytest.mark.slow  # two `finetune dataset inspect` subprocesses
def test_inspect_warns_when_fixed_sides_crop_a_panorama(tmp_path):
    make_image(tmp_path / "imgs" / "pano.png", 250, 1000)
    (tmp_path / "model").mkdir()
    config = tmp_path / "c.toml"
    config.write_text('[model]\npretrained = "model"\n[dataset]\nresolution = 512\nmin_side = 512\n'
                      '[[dataset.subsets]]\nfolder = "imgs"\n', encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "finetune", "dataset", "inspect", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "warning: the crop cuts more than 20% of the area of 1 of 1 image(s)" in done.stdout
    assert "pano.png (75% cut to 512x512)" in done.stdout
    # Left to the derived sides (256..1024 at 512) the panorama gets a 256x1024 bucket and no warning.
    config.write_text(config.read_text().replace("min_side = 512\n", ""), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "finetune", "dataset", "inspect", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert "256 x 1024" in done.stdout and "warning: the crop" not in done.stdout
