"""Sample rendering: prompts × seeds, reproducible by seed, the negative prompt reaching the pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune.sampling.pipelines import grid, render


@pytest.fixture(scope="module")
def pipe():
    from finetune.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixels(pipe, **kwargs):
    settings = {"steps": 2, "guidance_scale": 5.0, "height": 64, "width": 64, **kwargs}
    return [np.asarray(image, dtype=np.int16) for image in render(pipe, ["a red circle"], [0, 1], **settings)]


@pytest.mark.slow
def test_render_is_reproducible_per_seed_and_the_negative_prompt_changes_it(pipe):
    plain = pixels(pipe)
    assert len(plain) == 2 and plain[0].shape == (64, 64, 3)
    assert all((a == b).all() for a, b in zip(plain, pixels(pipe)))  # same seeds, same images
    assert not (plain[0] == plain[1]).all()  # another seed, another image
    negative = pixels(pipe, negative_prompt="blue squares")
    assert not (negative[0] == plain[0]).all()  # the negative prompt replaced the empty one in CFG
    assert grid(render(pipe, ["a", "b"], [0, 1, 2], steps=1, guidance_scale=1.0, height=64, width=64),
                columns=3).size == (192, 128)


def test_a_labelled_grid_names_each_tile_under_it(pipe):
    from PIL import Image

    tiles = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")]
    sheet = grid(tiles, columns=2, labels=["a red circle | step 10 | seed 0", "a red circle | step 10 | seed 1"])
    assert sheet.size == (128, 64 + 14)
    strip = np.asarray(sheet)[64:, :, :]
    assert (strip < 128).any()  # dark text on the white strip under each tile
    assert (np.asarray(sheet)[:64, :64] == (255, 0, 0)).all()  # the tiles themselves untouched


def test_render_reports_its_progress_on_the_console(pipe, capsys):
    render(pipe, ["a", "b"], [0], steps=2, guidance_scale=1.0, height=64, width=64, progress=True)
    err = capsys.readouterr().err
    assert "sample 1/2" in err and "sample 2/2" in err and "/4 " in err  # 2 images x 2 steps


@pytest.mark.slow  # builds or loads two pipelines
def test_a_pivotal_loras_bundled_word_joins_the_pipeline(tmp_path):
    from safetensors.torch import save_file

    from finetune.models.tiny import build_tiny_pipeline
    from finetune.tools.sample import apply_loras

    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": torch.randn(4, 64), f"{name}.lora_up.weight": torch.randn(64, 4),
               f"{name}.alpha": torch.tensor(4.0), "bundle_emb.<myDog>.clip_l": torch.randn(2, 32),
               "bundle_emb.<myDog>.clip_g": torch.randn(2, 64)}, str(tmp_path / "pivotal.safetensors"))
    pipe = build_tiny_pipeline(seed=0)
    [word] = apply_loras(pipe, [(tmp_path / "pivotal.safetensors", 1.0)])
    assert (word.token, word.vectors) == ("<myDog>", 2)
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        assert tokenizer("<myDog> <myDog>_1").input_ids == [49406, 49408, 49409, 49407]


def test_a_refiner_given_as_the_model_is_one_line_naming_the_refiner_option(tiny_refiner_dir, tmp_path):
    from finetune.errors import ModelError
    from finetune.tools.sample import render_from_model

    with pytest.raises(ModelError, match="with --refiner"):
        render_from_model(tiny_refiner_dir, "a red circle", tmp_path / "x.png", steps=1, height=64, width=64,
                          progress=False)
    assert not (tmp_path / "x.png").exists()


def test_sampling_precision_is_half_on_a_gpu_unless_told_and_fp16_needs_one():
    from finetune.errors import ConfigError
    from finetune.sampling.pipelines import sampling_dtype

    assert sampling_dtype(None, cuda=True) == torch.float16  # SDXL in fp32 would take ~13 GiB of a card
    assert sampling_dtype(None, cuda=False) == torch.float32
    assert sampling_dtype("bf16", cuda=False) == torch.bfloat16
    assert sampling_dtype("fp32", cuda=True) == torch.float32
    with pytest.raises(ConfigError, match="--dtype fp16 needs a CUDA GPU"):
        sampling_dtype("fp16", cuda=False)


def test_render_from_model_loads_the_weights_in_the_chosen_precision(tiny_model_dir, tmp_path, monkeypatch):
    from finetune.tools import sample

    seen = []
    real = sample.load_models
    monkeypatch.setattr(sample, "load_models", lambda cfg, dtype: seen.append(dtype) or real(cfg, dtype=dtype))
    out = sample.render_from_model(tiny_model_dir, "a red circle", tmp_path / "x.png", steps=1, height=64, width=64,
                                   progress=False, dtype="bf16")
    assert out.is_file() and seen == [torch.bfloat16]
