"""The tiny refiner: opens in diffusers' img2img pipeline, is told from the base by its weights, and its
text conditioning and micro-conditioning are exactly the pipeline's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from finetune.errors import ModelError
from finetune.models.load import load_models
from finetune.models.refiner import kind_of_folder, kind_of_keys, kind_of_unet
from finetune.models.text import encode_prompts


@pytest.fixture(scope="session")
def refiner_pipe(tiny_refiner_dir):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_refiner_dir, local_files_only=True)


def model_cfg(path, kind="auto"):
    return SimpleNamespace(pretrained=path, vae=None, allow_pickle=False, name=None, kind=kind)


def test_tiny_refiner_opens_in_the_img2img_pipeline_with_refiner_conditioning(refiner_pipe):
    assert refiner_pipe.text_encoder is None and refiner_pipe.tokenizer is None
    assert refiner_pipe.config.requires_aesthetics_score
    assert refiner_pipe.tokenizer_2.pad_token == "!" and refiner_pipe.tokenizer_2.pad_token_id == 0
    assert len(refiner_pipe.unet.config.down_block_types) == 4
    assert kind_of_unet(refiner_pipe.unet) == "refiner"


def test_kind_is_read_from_the_weights_and_a_mismatch_is_one_line(tiny_model_dir, tiny_refiner_dir):
    assert kind_of_folder(tiny_model_dir) == "base" and kind_of_folder(tiny_refiner_dir) == "refiner"
    models = load_models(model_cfg(tiny_refiner_dir))
    assert models.kind == "refiner" and models.tokenizers == (models.tokenizer_2,)
    with pytest.raises(ModelError, match="is an SDXL refiner, but model.kind = 'base'") as err:
        load_models(model_cfg(tiny_refiner_dir, "base"))
    assert str(tiny_refiner_dir) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ModelError, match="is an SDXL base, but model.kind = 'refiner'"):
        load_models(model_cfg(tiny_model_dir, "refiner"))


def test_single_file_refiner_round_trips_and_is_detected(refiner_pipe, tiny_refiner_dir, tmp_path):
    from finetune.models.single_file import load_single_file_pipeline, read_shapes, save_single_file

    path = save_single_file(refiner_pipe, tmp_path / "refiner.safetensors")
    shapes = read_shapes(path)
    assert kind_of_keys(shapes) == "refiner"
    assert not any(k.startswith("conditioner.embedders.1.") for k in shapes)
    loaded = load_single_file_pipeline(path, config_dir=tiny_refiner_dir)
    assert type(loaded).__name__ == "StableDiffusionXLImg2ImgPipeline"
    for name in ("unet", "text_encoder_2", "vae"):
        ours, theirs = getattr(refiner_pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours if "position_ids" not in k), name


@pytest.mark.parametrize("captions", [["a red circle", ""], ["a photo of a cat, " * 30]])
def test_text_conditioning_equals_the_pipelines_encode_prompt(refiner_pipe, captions):
    with torch.no_grad():
        embeds, pooled = encode_prompts(captions, (refiner_pipe.tokenizer_2,), (refiner_pipe.text_encoder_2,))
        ref_embeds, _, ref_pooled, _ = refiner_pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    assert embeds.shape == (len(captions), 77, refiner_pipe.text_encoder_2.config.hidden_size)
    torch.testing.assert_close(embeds, ref_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-6, rtol=0)


def test_text_caches_of_base_and_refiner_never_share_keys_and_latents_do(tiny_model_dir, tiny_refiner_dir):
    from finetune.cache.keys import text_identity, text_key, vae_identity

    base, refiner = load_models(model_cfg(tiny_model_dir)), load_models(model_cfg(tiny_refiner_dir))
    # The tiny pair shares bigG (as the real pair does): the base's key covers CLIP-L as well.
    base_id = text_identity(base.tokenizers, base.text_encoders)
    refiner_id = text_identity(refiner.tokenizers, refiner.text_encoders)
    assert base_id != refiner_id
    assert text_key("a cat", base_id, "truncate", "fp16") != text_key("a cat", refiner_id, "truncate", "fp16")
    assert vae_identity(base.vae) == vae_identity(refiner.vae)  # same VAE: latent entries are shared
