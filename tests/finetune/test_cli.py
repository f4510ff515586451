"""The command line: one clear line for bad input, summary lines for the cache command, help texts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import make_image


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "finetune", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def write_config(tmp_path, model, images) -> str:
    path = tmp_path / "c.toml"
    path.write_text(f'[model]\npretrained = "{model}"\n[dataset]\nresolution = 128\nmin_side = 64\n'
                    f'[[dataset.subsets]]\nfolder = "{images}"\n[training]\nmixed_precision = "no"\n', encoding="utf-8")
    return path


def test_help_explains_every_subcommand():
    done = run("--help")
    for command in ("quickstart", "tiny-model", "train", "dataset", "cache", "merge", "convert", "extract", "caption"):
        assert command in done.stdout
    assert "--resume" in run("train", "--help").stdout


@pytest.mark.slow
def test_not_an_sdxl_folder_and_empty_image_folder_are_one_line_errors(tmp_path, tiny_model_dir):
    (tmp_path / "model").mkdir()
    (tmp_path / "images").mkdir()
    # The model is checked first (from its configs, no weights): before the scan of the images.
    done = run("train", write_config(tmp_path, tmp_path / "model", tmp_path / "images"))
    assert done.returncode == 2 and "not an SDXL diffusers folder" in done.stderr and str(tmp_path / "model") in done.stderr
    assert "Traceback" not in done.stderr
    done = run("train", write_config(tmp_path, tiny_model_dir, tmp_path / "images"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "no usable image" in done.stderr and str(tmp_path / "images") in done.stderr


@pytest.mark.slow
def test_cache_command_prints_encoded_and_reused(tmp_path, tiny_model_dir):
    images = tmp_path / "images"
    for i in range(3):
        make_image(images / f"{i}.png", 64, 64 + 32 * i, color=(50 * i, 10, 10))
    config = write_config(tmp_path, tiny_model_dir, images)
    first = run("cache", config)
    assert first.returncode == 0, first.stderr
    assert "latents: 3 encoded, 0 reused" in first.stdout and "text: 2 encoded, 0 reused" in first.stdout
    second = run("cache", config)
    assert "latents: 0 encoded, 3 reused" in second.stdout and "text: 0 encoded, 2 reused" in second.stdout
    shutil.rmtree(tmp_path / "output")


@pytest.mark.slow
def test_quickstart_runs_offline_and_keeps_library_noise_off_the_console(tmp_path):
    """The README's first command, end to end (3 steps): every file it lists exists, and the console
    shows our lines, not library deprecation or dtype chatter."""
    done = run("quickstart", "--out", tmp_path / "qs", "--steps", 3)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("train_config.toml", "output/quickstart_lora.safetensors", "merged-sdxl/unet", "sample.png"):
        assert (tmp_path / "qs" / name).exists(), name
    assert "quickstart finished" in done.stdout
    for noise in ("FutureWarning", "should be kept in float32", "requires torchvision", "Traceback"):
        assert noise not in done.stdout + done.stderr, noise


def test_quickstart_never_writes_into_a_folder_it_did_not_make(tmp_path):
    from finetune.errors import ConfigError
    from finetune.tools.quickstart import claim_folder

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "holiday.jpg").write_bytes(b"a user's file")
    with pytest.raises(ConfigError, match="not made by an earlier quickstart"):
        claim_folder(tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["holiday.jpg"]
    claim_folder(tmp_path / "new" / "folder")  # new folders are made
    assert (tmp_path / "new" / "folder").is_dir()


def test_quickstart_replaces_the_run_of_an_earlier_quickstart_in_its_folder(tmp_path):
    from finetune.tools.quickstart import claim_folder, quickstart_config

    (tmp_path / "qs" / "output" / "checkpoints").mkdir(parents=True)
    (tmp_path / "qs" / "merged-sdxl").mkdir()
    (tmp_path / "qs" / "train_config.toml").write_text(quickstart_config(3), encoding="utf-8")
    claim_folder(tmp_path / "qs")
    assert sorted(p.name for p in (tmp_path / "qs").iterdir()) == ["train_config.toml"]


@pytest.mark.slow
def test_refiner_quickstart_trains_a_refiner_lora_and_samples_in_two_stages(tmp_path, capsys):
    from safetensors import safe_open

    from finetune.tools.quickstart_refiner import run_refiner_quickstart

    files = run_refiner_quickstart(tmp_path / "qs", steps=1)
    with safe_open(str(files["refiner LoRA"]), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-refiner/lora"
    plain, tuned = files["two-stage sample"], files["two-stage sample with the LoRA"]
    assert plain.stat().st_size > 0 and tuned.stat().st_size > 0
    out = capsys.readouterr().out
    assert "[5/5] the same with the refiner LoRA" in out and str(tuned) in out


def test_a_full_disk_anywhere_is_one_line_not_a_traceback(monkeypatch, capsys):
    import errno

    from finetune import cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/out/lora.safetensors.tmp")

    monkeypatch.setattr(cli, "cmd_tiny_model", full)
    assert cli.main(["tiny-model", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: disk full writing /out/lora.safetensors.tmp;") and "--resume" in err

    def other(args):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(cli, "cmd_tiny_model", other)
    with pytest.raises(PermissionError):  # not ours to reword: the traceback says what failed
        cli.main(["tiny-model", "x"])


def test_every_subcommand_and_option_says_what_it_does():
    import argparse

    from finetune.cli import build_parser

    def parsers(parser, name="finetune"):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from parsers(sub, f"{name} {sub_name}")

    missing = []
    for name, parser in parsers(build_parser()):
        if not parser.description:
            missing.append(f"{name}: no description")
        for action in parser._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) and not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}: no help")
    assert not missing, missing
    sample = build_parser()._subparsers._group_actions[0].choices["sample"].format_help()
    assert "(default: 1024)" in sample and "(default: 20)" in sample  # defaults are shown


def test_dataset_build_refuses_an_output_dir_inside_the_images(tmp_path, capsys):
    from finetune import cli

    (tmp_path / "model").mkdir()
    make_image(tmp_path / "images" / "a.png", 64, 64)
    config = write_config(tmp_path, tmp_path / "model", tmp_path / "images")
    assert cli.main(["dataset", "build", str(config), "--set", f"output.dir={tmp_path / 'images' / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert f"output.dir = {tmp_path / 'images' / 'out'} is inside the image folder {tmp_path / 'images'}" in err
    assert os.listdir(tmp_path / "images") == ["a.png"]  # no manifest, no work folder among the images


def test_out_of_memory_outside_training_is_one_line_with_what_to_lower(tmp_path, monkeypatch, capsys):
    import torch

    from finetune.cache import prepare
    from finetune.cli import main

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(prepare, "build_caches", no_memory)
    (tmp_path / "model").mkdir()
    (tmp_path / "images").mkdir()
    assert main(["cache", str(write_config(tmp_path, tmp_path / "model", tmp_path / "images"))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of GPU memory in `finetune cache`") and "cache.batch_size" in err
