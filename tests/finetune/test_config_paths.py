"""The output folder's checks: never among the images, a folder, writable; each refusal names the path."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from finetune.config import check_output_dir, load_config
from finetune.errors import ConfigError

CONFIG = """
[model]
pretrained = "model"
[dataset]
resolution = 256
[[dataset.subsets]]
folder = "images"
[output]
dir = "{out}"
"""


def config(tmp_path: Path, out: str):
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "images").mkdir(exist_ok=True)
    path = tmp_path / "c.toml"
    path.write_text(CONFIG.format(out=out), encoding="utf-8")
    return load_config(path)


def refusal(tmp_path: Path, out: str) -> str:
    cfg = config(tmp_path, out)
    with pytest.raises(ConfigError) as info:
        check_output_dir(cfg.output, cfg.dataset)
    return str(info.value)


@pytest.mark.parametrize("out", ["images", "images/run", "images/./deeper/run"])
def test_an_output_dir_among_the_images_is_refused_before_anything_is_written(tmp_path, out):
    message = refusal(tmp_path, out)
    assert f"output.dir = {tmp_path / out}".replace("/./", "/") in message
    assert f"the image folder {tmp_path / 'images'} (dataset.subsets.0.folder)" in message
    assert "set output.dir to a folder outside it" in message
    assert os.listdir(tmp_path / "images") == []  # not even the output folder was made


def test_symlinks_are_resolved_both_ways(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "images")
    message = refusal(tmp_path, str(tmp_path / "alias" / "run"))  # absolute: the config keeps it as written
    assert f"output.dir = {tmp_path / 'alias' / 'run'} is inside the image folder" in message
    assert f"symlinks resolved: {tmp_path / 'images' / 'run'}" in message
    (tmp_path / "linked-out").symlink_to(tmp_path / "images", target_is_directory=True)
    assert "is the image folder" in refusal(tmp_path, str(tmp_path / "linked-out"))


def test_a_file_or_a_path_under_a_file_is_named(tmp_path):
    (tmp_path / "taken").write_text("a file")
    message = refusal(tmp_path, "taken")
    assert message.startswith(f"output.dir = {tmp_path / 'taken'} is a file, not a folder")
    message = refusal(tmp_path, "taken/run")
    assert f"cannot be created: {tmp_path / 'taken'} is a file" in message


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where nothing can be created")
def test_a_folder_that_cannot_be_created_is_named_once(tmp_path):
    try:
        os.rmdir(tempfile.mkdtemp(dir="/proc"))
        pytest.skip("/proc accepts new folders here")
    except OSError:
        pass
    message = refusal(tmp_path, "/proc/finetune-run")
    assert message.startswith("output.dir = /proc/finetune-run cannot be created (/proc cannot be written to)")
    assert "point output.dir at a folder you can write to" in message


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_named(tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        assert "cannot be written to" in refusal(tmp_path, "ro")
        assert f"cannot be created ({tmp_path / 'ro'} cannot be written to)" in refusal(tmp_path, "ro/run")
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_a_usable_output_dir_passes_and_is_not_created(tmp_path):
    cfg = config(tmp_path, "runs/one")
    check_output_dir(cfg.output, cfg.dataset)
    assert not (tmp_path / "runs").exists() and sorted(os.listdir(tmp_path)) == ["c.toml", "images", "model"]
    (tmp_path / "images-out").mkdir()  # a sibling whose name starts like the image folder's is not inside it
    cfg = config(tmp_path, "images-out")
    check_output_dir(cfg.output, cfg.dataset)
