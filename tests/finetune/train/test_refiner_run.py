"""Training the tiny refiner end to end: its micro-conditioning is the img2img pipeline's, a LoRA and a full
fine-tune train and resume bitwise, the LoRA loads in diffusers and merges with the training-time effect,
and the two-stage sample changes with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer_runs import adapter_tensors, assert_resolved_is_the_runs, make_shapes_folder, write_config
from finetune.config import load_config
from finetune.errors import ModelError
from finetune.train.recipe import train

pytestmark = pytest.mark.slow

SCORES = {"0.png": 8.5, "2.png": 3.25}


@pytest.fixture(scope="module")
def scored_folder(tmp_path_factory) -> Path:
    folder = make_shapes_folder(tmp_path_factory.mktemp("scored"))
    lines = [{"file_name": name, "text": f"a red drawing number {name[0]}", "aesthetic_score": score}
             for name, score in SCORES.items()]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    return folder


def refiner_config(folder: Path, model: Path, images: Path, steps: int, extra: str = "") -> Path:
    path = write_config(folder, model, images, steps=steps, every=2, extra=extra)
    # fp32 files: the merge and load checks compare with the training-time adapter at 1e-4.
    path.write_text(path.read_text().replace('name = "lora"', 'name = "lora"\nsave_dtype = "fp32"'))
    return path


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_refiner_dir, scored_folder):
    folder = tmp_path_factory.mktemp("refiner-lora")
    cfg = load_config(refiner_config(folder, tiny_refiner_dir, scored_folder, steps=4))
    return cfg, train(cfg, progress=False)


def fixed_input(unet):
    g = torch.Generator().manual_seed(0)
    cond = {"encoder_hidden_states": torch.randn(1, 77, unet.config.cross_attention_dim, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(1, 64, generator=g),
                                  "time_ids": torch.tensor([[128.0, 128, 0, 0, 6.0]])}}
    return torch.randn(1, 4, 16, 16, generator=g), cond


def unet_out(unet):
    sample, cond = fixed_input(unet)
    with torch.no_grad():
        return unet(sample, torch.tensor([150]), **cond).sample


def test_the_resolved_config_keeps_the_refiners_timesteps(lora_run):
    cfg, _ = lora_run
    assert_resolved_is_the_runs(cfg.output.dir)
    resolved = load_config(cfg.output.dir / "config.resolved.toml")
    assert (resolved.loss.min_timestep, resolved.loss.max_timestep) == (0, 200)


def test_add_time_ids_equal_the_img2img_pipelines_for_every_row(lora_run, tiny_refiner_dir):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from bucketing.manifest import load_manifest
    from finetune.train.batches import TrainDataset

    cfg, _ = lora_run
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_refiner_dir, local_files_only=True)
    manifest = load_manifest(cfg.output.manifest_dir)
    dataset = TrainDataset(manifest, cfg.dataset, seed=0, kind="refiner")
    seen = set()
    for i, row in enumerate(manifest):
        score = SCORES.get(row["path"], 6.0)
        seen.add(score)
        ours = dataset[i]["add_time_ids"]
        theirs, _ = pipe._get_add_time_ids(tuple(row["original_size"]), tuple(row["crop_top_left"]),
                                           tuple(row["bucket"]), score, 2.5, tuple(row["original_size"]),
                                           tuple(row["crop_top_left"]), tuple(row["bucket"]), torch.float32,
                                           pipe.text_encoder_2.config.projection_dim)
        assert torch.equal(ours, theirs[0]), row["path"]
    assert seen == {8.5, 3.25, 6.0}


def trained_unet(cfg, path: Path, model_dir: Path):
    """The refiner's UNet carrying the file's adapter as training built it (peft layers, our loader)."""
    from diffusers import UNet2DConditionModel

    from finetune.adapters.inject import add_unet_adapter
    from finetune.adapters.load import load_adapter_weights

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", local_files_only=True)
    add_unet_adapter(unet, cfg.lora)
    load_adapter_weights(unet, None, path)
    return unet.eval()


def test_lora_file_is_a_refiner_lora_that_diffusers_loads_with_the_training_effect(lora_run, tiny_refiner_dir):
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from safetensors import safe_open

    cfg, result = lora_run
    assert result.step == 4 and len(result.losses) == 4
    with safe_open(str(result.output_path), "pt") as fh:
        keys, metadata = list(fh.keys()), fh.metadata()
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-refiner/lora"
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.startswith("lora_unet_output_blocks_6_1_") for k in keys)  # a refiner-only SGM block
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_refiner_dir, local_files_only=True)
    before = unet_out(pipe.unet)
    pipe.load_lora_weights(str(result.output_path))
    loaded = unet_out(pipe.unet)
    reference = unet_out(trained_unet(cfg, result.output_path, tiny_refiner_dir))
    assert (loaded - before).abs().max() > 1e-4
    torch.testing.assert_close(loaded, reference, atol=1e-4, rtol=0)


def test_lora_merges_into_diffusers_and_single_file_refiners(lora_run, tiny_refiner_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from finetune.models.single_file import load_single_file_pipeline, save_single_file
    from finetune.models.tiny_refiner import build_tiny_refiner
    from finetune.tools.merge import merge_loras

    cfg, result = lora_run
    reference = unet_out(trained_unet(cfg, result.output_path, tiny_refiner_dir))
    merge_loras(tiny_refiner_dir, [(result.output_path, 1.0)], tmp_path / "merged")
    folder_unet = UNet2DConditionModel.from_pretrained(tmp_path / "merged", subfolder="unet", local_files_only=True)
    torch.testing.assert_close(unet_out(folder_unet), reference, atol=1e-4, rtol=0)

    single = save_single_file(build_tiny_refiner(), tmp_path / "refiner.safetensors")
    merge_loras(single, [(result.output_path, 1.0)], tmp_path / "merged.safetensors")
    merged = load_single_file_pipeline(tmp_path / "merged.safetensors", config_dir=tiny_refiner_dir)
    torch.testing.assert_close(unet_out(merged.unet), reference, atol=1e-4, rtol=0)


def test_a_refiner_lora_is_refused_by_a_base_and_the_reverse(lora_run, tiny_model_dir, tmp_path):
    from finetune.tools.merge import merge_loras

    _, result = lora_run
    with pytest.raises(ModelError, match="an SDXL refiner LoRA cannot merge into") as err:
        merge_loras(tiny_model_dir, [(result.output_path, 1.0)], tmp_path / "out")
    assert str(result.output_path) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_lora_resume_is_bitwise(lora_run, tmp_path, tiny_refiner_dir, scored_folder):
    _, whole = lora_run
    path = refiner_config(tmp_path, tiny_refiner_dir, scored_folder, steps=4)
    train(load_config(path, ["training.max_steps=2"]), progress=False)
    resumed = train(load_config(path), resume="latest", progress=False)
    ours, theirs = adapter_tensors(resumed.output_path), adapter_tensors(whole.output_path)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert resumed.losses == whole.losses[2:]


def test_full_fine_tune_trains_and_resumes_bitwise(tmp_path, tiny_refiner_dir, scored_folder):
    for name, steps in (("whole", [None]), ("parts", ["training.max_steps=1", None])):
        (tmp_path / name).mkdir()
        path = refiner_config(tmp_path / name, tiny_refiner_dir, scored_folder, steps=2)
        path.write_text(path.read_text().replace("[training]", '[training]\nmethod = "full"'))
        for i, override in enumerate(steps):
            result = train(load_config(path, [override] if override else []), resume="latest" if i else None,
                           progress=False)
    whole = adapter_tensors(tmp_path / "whole" / "out" / "lora.safetensors")
    parts = adapter_tensors(tmp_path / "parts" / "out" / "lora.safetensors")
    assert result.step == 2 and all(k.startswith("model.diffusion_model.") for k in whole)
    assert all(torch.equal(whole[k], parts[k]) for k in whole)


def test_two_stage_sample_runs_and_changes_with_the_refiner_lora(lora_run, tiny_model_dir, tiny_refiner_dir):
    from finetune.sampling.pipelines import two_stage
    from finetune.tools.refine import load_pair

    _, result = lora_run
    args = dict(seed=0, steps=5, switch=0.8, guidance_scale=1.0, height=64, width=64, output_type="latent")
    base, refiner = load_pair(tiny_model_dir, tiny_refiner_dir, progress=False)
    plain = two_stage(base, refiner, "a red circle", **args)
    base, refiner = load_pair(tiny_model_dir, tiny_refiner_dir, refiner_loras=[(result.output_path, 1.0)],
                              progress=False)
    tuned = two_stage(base, refiner, "a red circle", **args)
    assert plain.shape == (4, 8, 8) and (plain - tuned).abs().max() > 1e-5
    with pytest.raises(ModelError, match="pass it with --refiner-lora"):
        load_pair(tiny_model_dir, tiny_refiner_dir, loras=[(result.output_path, 1.0)], progress=False)


def test_convert_resize_and_extract_keep_refiner_names(lora_run, tiny_refiner_dir, tmp_path):
    from safetensors import safe_open

    from finetune.adapters.convert import convert_lora
    from finetune.tools.extract import extract_lora
    from finetune.tools.merge import merge_loras
    from finetune.tools.resize import resize_lora

    _, result = lora_run
    original = adapter_tensors(result.output_path)
    peft = convert_lora(result.output_path, tmp_path / "peft.safetensors", "diffusers")
    back = adapter_tensors(convert_lora(peft, tmp_path / "back.safetensors", "kohya"))
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in back)
    resized = adapter_tensors(resize_lora(result.output_path, tmp_path / "r2.safetensors", 2).out)
    assert {k.split(".")[0] for k in resized} == {k.split(".")[0] for k in original}
    merge_loras(tiny_refiner_dir, [(result.output_path, 1.0)], tmp_path / "merged")
    extract_lora(tiny_refiner_dir, tmp_path / "merged", 4, tmp_path / "extracted.safetensors")
    with safe_open(str(tmp_path / "extracted.safetensors"), "pt") as fh:
        assert fh.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-refiner/lora"
        assert {k.split(".")[0] for k in fh.keys()} == {k.split(".")[0] for k in original}


def test_training_samples_of_a_refiner_run_refine_a_dataset_image_or_follow_the_base(lora_run, tiny_model_dir):
    from PIL import Image

    from finetune.models.load import load_models
    from finetune.train.samples import render_training_samples

    cfg, _ = lora_run
    cfg = cfg.model_copy(deep=True)
    cfg.sample.prompts, cfg.sample.steps, cfg.sample.height, cfg.sample.width = ["a red circle"], 4, 64, 64
    models = load_models(cfg.model)
    for base in (None, tiny_model_dir):
        cfg.sample.base = base
        (path,) = render_training_samples(models.unet, models, cfg.sample, cfg.output, cfg.dataset.resolution, 7,
                                            "cpu")
        # Without a base the dataset image is refined at its bucket's size; with one, at the sample size.
        # (Widths only: the grid adds a label strip under each tile.)
        assert Image.open(path).size[0] == (128 if base is None else 64)
