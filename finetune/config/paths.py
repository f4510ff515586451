"""What a config's output folder must be on disk before a run writes anything: outside every image
folder, a folder (or creatable as one), and writable."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from finetune.config.data import DatasetConfig
from finetune.config.schema import OutputConfig
from finetune.errors import ConfigError


def check_output_dir(output: OutputConfig, dataset: DatasetConfig) -> None:
    """Refuse an `output.dir` among the user's images, one that is a file, and one that cannot be
    created or written. Writes nothing that stays: writing is tried with an empty temporary folder,
    removed at once.

    Raises:
        ConfigError: naming output.dir (and the image folder) and what to do.
    """
    out = Path(output.dir)
    _outside_images(out, dataset)  # first: not even a probe may be written among the images
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"output.dir = {out} is a symlink to {os.readlink(out)}, which does not exist: "
                          "remove the link or point output.dir at a folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output.dir = {out} is a file, not a folder: point output.dir at a folder "
                          "(it is created when missing)")
    existing = out
    while not existing.exists():  # the nearest folder that exists: where creating output.dir starts
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output.dir = {out} cannot be created: {existing} is a file, not a folder; "
                          "point output.dir at a path whose parents are folders")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".finetune-write-test-", dir=existing))
    except OSError as err:
        what = "written to" if existing == out else f"created ({existing} cannot be written to)"
        raise ConfigError(f"output.dir = {out} cannot be {what}: {err.strerror or err}; point output.dir at "
                          "a folder you can write to (on a disk with free space)") from None


def _outside_images(out: Path, dataset: DatasetConfig) -> None:
    """ConfigError when `out` is an image folder or lies inside one, symlinks resolved."""
    real_out = Path(os.path.realpath(out))
    for index, subset in enumerate(dataset.subsets):
        for key in ("folder", "hf_dataset"):
            images = getattr(subset, key)
            if images is None:
                continue
            real_images = Path(os.path.realpath(images))
            if real_out != real_images and real_images not in real_out.parents:
                continue
            where = "is" if real_out == real_images else "is inside"
            same = (real_out, real_images) == (out, Path(images))
            resolved = "" if same else f" (symlinks resolved: {real_out} and {real_images})"
            raise ConfigError(
                f"output.dir = {out} {where} the image folder {images} (dataset.subsets.{index}.{key}){resolved}: "
                "the run would write its manifest, caches, checkpoints and samples among your images, and "
                "the next scan would take them for training images; set output.dir to a folder outside it")
