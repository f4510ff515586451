"""load_models: diffusers folders, single files, a separate VAE, and the errors for anything else."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from finetune.config import ModelConfig
from finetune.errors import ModelError
from finetune.models import single_file
from finetune.models.load import load_models

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def folder_models(tiny_model_dir):
    return load_models(ModelConfig(pretrained=tiny_model_dir))


def test_folder_loads_every_part_and_a_ddpm_scheduler(folder_models, tiny_model_dir):
    from diffusers import DDPMScheduler

    models = folder_models
    assert models.name == "tiny-sdxl" and models.source_path == tiny_model_dir
    assert isinstance(models.noise_scheduler, DDPMScheduler)
    # SDXL's training noise schedule, taken from the model's own scheduler config.
    assert models.noise_scheduler.config.num_train_timesteps == 1000
    assert models.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert models.tokenizers == (models.tokenizer, models.tokenizer_2)
    assert models.text_encoders == (models.text_encoder, models.text_encoder_2)


def test_dtype_is_applied(tiny_model_dir):
    models = load_models(ModelConfig(pretrained=tiny_model_dir), dtype=torch.bfloat16)
    assert models.unet.dtype == torch.bfloat16 and models.text_encoder_2.dtype == torch.bfloat16


def test_single_file_loads_the_same_weights(folder_models, tiny_model_dir, tmp_path, monkeypatch):
    path = single_file.save_single_file(folder_models, tmp_path / "tiny-file.safetensors")
    # The bundled configs describe full-size SDXL; the tiny model brings its own.
    monkeypatch.setattr(single_file, "default_config_dir", lambda *kind: tiny_model_dir)
    models = load_models(ModelConfig(pretrained=path, name="mine"))
    assert models.name == "mine" and models.source_path == path
    for part in PARTS:
        assert same_weights(getattr(models, part), getattr(folder_models, part)), part


def test_separate_vae_replaces_the_checkpoint_vae(folder_models, tiny_model_dir, tmp_path):
    other = {k: v + 1 for k, v in folder_models.vae.state_dict().items()}
    vae_dir = tmp_path / "vae"
    vae_dir.mkdir()
    (vae_dir / "config.json").write_bytes((tiny_model_dir / "vae" / "config.json").read_bytes())
    save_file(other, str(vae_dir / "diffusion_pytorch_model.safetensors"))
    models = load_models(ModelConfig(pretrained=tiny_model_dir, vae=vae_dir))
    assert torch.equal(models.vae.state_dict()["decoder.conv_out.bias"], other["decoder.conv_out.bias"])
    assert same_weights(models.unet, folder_models.unet)


def test_folder_that_is_not_diffusers_is_refused(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelError, match="not an SDXL diffusers folder.*vae"):
        load_models(ModelConfig(pretrained=tmp_path))


def test_pickle_and_non_sdxl_files_are_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(ModelError, match="model.ckpt.*allow_pickle"):
        load_models(ModelConfig(pretrained=ckpt))
    other = tmp_path / "sd15.safetensors"
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(768)}, str(other))
    with pytest.raises(ModelError, match="sd15.safetensors.*SD 1.x"):
        load_models(ModelConfig(pretrained=other))


@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    """The tiny model as one SGM file, and with an inpainting UNet (9 input channels) as a diffusers folder
    and as one SGM file: {"base file", "inpainting folder", "inpainting file"}."""
    from diffusers import UNet2DConditionModel

    from finetune.models.tiny import build_tiny_pipeline, tiny_unet_config

    out = tmp_path_factory.mktemp("inpainting")
    pipe = build_tiny_pipeline(0)
    paths = {"base file": single_file.save_single_file(pipe, out / "base.safetensors")}
    pipe.register_modules(unet=UNet2DConditionModel(**{**tiny_unet_config(), "in_channels": 9}))
    pipe.save_pretrained(out / "folder", safe_serialization=True)
    return {**paths, "inpainting folder": out / "folder",
            "inpainting file": single_file.save_single_file(pipe, out / "inpainting.safetensors")}


@pytest.mark.parametrize("layout", ["folder", "file"])
def test_an_inpainting_unet_is_refused_before_any_weight_is_read(single_files, layout, monkeypatch):
    from finetune.models.load import check_unet_inputs

    path = single_files[f"inpainting {layout}"]
    monkeypatch.setattr(single_file, "load_file", None)  # the header is enough: no tensor may be loaded
    with pytest.raises(ModelError) as info:
        check_unet_inputs(ModelConfig(pretrained=path))
    message = str(info.value)
    assert str(path) in message and "the UNet takes 9 input channels (an inpainting UNet" in message
    assert "training supports 4 input channels (SDXL base or refiner)" in message
    if layout == "file":
        assert "model.diffusion_model.input_blocks.0.0.weight has shape (32, 9, 3, 3)" in message


def test_sdxl_base_and_refiner_unets_pass_the_input_check(tiny_model_dir, tiny_refiner_dir, single_files):
    from finetune.models.load import check_unet_inputs

    for path in (tiny_model_dir, tiny_refiner_dir, single_files["base file"]):
        check_unet_inputs(ModelConfig(pretrained=path))
