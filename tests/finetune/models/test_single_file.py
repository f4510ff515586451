"""Single-file SDXL: our SGM writer round-trips through diffusers' loader; refusals name the file."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from finetune.errors import ModelError
from finetune.models.single_file import (
    TE2_PREFIX,
    VAE_PREFIX,
    check_sdxl_keys,
    default_config_dir,
    load_single_file_pipeline,
    load_vae,
    save_single_file,
    sgm_state_dict,
)

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model_dir):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_model_dir, local_files_only=True)


@pytest.fixture(scope="module")
def tiny_single_file(tiny_pipe, tmp_path_factory) -> Path:
    return save_single_file(tiny_pipe, tmp_path_factory.mktemp("single") / "tiny.safetensors",
                            metadata={"modelspec.title": "tiny"})


def assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_single_file_round_trips_through_diffusers(tiny_pipe, tiny_single_file, tiny_model_dir):
    loaded = load_single_file_pipeline(tiny_single_file, config_dir=tiny_model_dir)
    for part in PARTS:
        assert_same_weights(getattr(loaded, part), getattr(tiny_pipe, part))


def test_single_file_layout_and_metadata(tiny_single_file):
    with safe_open(str(tiny_single_file), "pt") as fh:
        keys = set(fh.keys())
        assert fh.metadata()["modelspec.title"] == "tiny"
    prefixes = {"model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                "conditioner.embedders.1.model."}
    assert all(any(k.startswith(p) for p in prefixes) for k in keys)
    assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight" in keys
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in keys  # diffusers up_blocks.0, reversed
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight" in keys


def test_openclip_qkv_and_projection_layout(tiny_pipe, tiny_single_file):
    state = load_file(str(tiny_single_file))
    layer = tiny_pipe.text_encoder_2.text_model.encoder.layers[1].self_attn
    fused = state[f"{TE2_PREFIX}transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(fused, torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]))
    assert torch.equal(state[f"{TE2_PREFIX}text_projection"], tiny_pipe.text_encoder_2.text_projection.weight.T)


def test_save_casts_to_dtype(tiny_pipe, tmp_path):
    path = save_single_file(tiny_pipe, tmp_path / "half.safetensors", dtype=torch.float16)
    state = load_file(str(path))
    assert {t.dtype for t in state.values()} == {torch.float16}


def _meta_sdxl():
    """Full-size SDXL built on the meta device: real names and shapes, no memory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from finetune.models.configs import sdxl_text_configs, sdxl_unet_config, sdxl_vae_config

    clean = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    te1, te2 = sdxl_text_configs()
    with torch.device("meta"):
        return SimpleNamespace(
            unet=UNet2DConditionModel(**clean(sdxl_unet_config())),
            vae=AutoencoderKL(**clean(sdxl_vae_config())),
            text_encoder=CLIPTextModel(CLIPTextConfig(**te1)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**te2)),
        )


def test_full_size_keys_are_what_diffusers_single_file_loader_reads():
    from diffusers.loaders import single_file_utils as sfu

    parts = _meta_sdxl()
    state = sgm_state_dict(parts)
    assert sfu.infer_diffusers_model_type(state) == "xl_base"
    for marker in ("xl_base", "clip_sdxl", "open_clip_sdxl"):
        assert sfu.CHECKPOINT_KEY_NAMES[marker] in state
    check_sdxl_keys(Path("meta.safetensors"), {k: tuple(v.shape) for k, v in state.items()})
    # diffusers' own converters must turn our file back into every weight, name and shape.
    converted = {
        "unet": sfu.convert_ldm_unet_checkpoint(state, dict(parts.unet.config)),
        "vae": sfu.convert_ldm_vae_checkpoint(state, dict(parts.vae.config)),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(state).items()},
        "text_encoder_2": sfu.convert_open_clip_checkpoint(parts.text_encoder_2, state, prefix=TE2_PREFIX),
    }
    for part, weights in converted.items():
        expected = {k: tuple(v.shape) for k, v in getattr(parts, part).state_dict().items()}
        assert {k: tuple(v.shape) for k, v in weights.items()} == expected, part
    # q, k, v weights and biases are fused into in_proj_weight/bias in each of the 32 layers: 6 keys -> 2.
    assert len(state) == sum(len(w) for w in converted.values()) - 4 * 32


def test_default_config_dir_is_materialized_once_in_xdg_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = default_config_dir()
    assert folder == tmp_path / "cache" / "sdxl-finetune" / "sdxl_base"
    assert (folder / "unet" / "config.json").is_file() and (folder / "tokenizer_2").is_dir()
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert default_config_dir() == folder
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp


# --- refusals ------------------------------------------------------------------------------------

class NotATensor:
    pass


def test_pickles_are_refused_unless_allowed(tiny_single_file, tiny_model_dir, tiny_pipe, tmp_path):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(tiny_single_file))}, ckpt)
    with pytest.raises(ModelError, match=r"tiny\.ckpt.*allow_pickle"):
        load_single_file_pipeline(ckpt, config_dir=tiny_model_dir)
    loaded = load_single_file_pipeline(ckpt, allow_pickle=True, config_dir=tiny_model_dir)
    assert_same_weights(loaded.unet, tiny_pipe.unet)


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path):
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": NotATensor()}, ckpt)
    with pytest.raises(ModelError, match=r"evil\.ckpt.*safely"):
        load_single_file_pipeline(ckpt, allow_pickle=True)


@pytest.mark.parametrize("keys, found", [
    ({"cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
      "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)}, "SD 1.x/2.x"),
    ({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)}, "label_emb"),
    ({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": (4, 640)}, "LoRA"),
    ({"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}, "diffusers-named"),
    ({"encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3)}, "only a VAE"),
])
def test_not_sdxl_is_refused_naming_what_was_found(tmp_path, keys, found):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    with pytest.raises(ModelError, match="other.safetensors") as err:
        load_single_file_pipeline(path)
    assert found in str(err.value)


# --- separate VAE --------------------------------------------------------------------------------

def test_vae_loads_from_every_layout(tiny_pipe, tiny_single_file, tiny_model_dir, tmp_path):
    state = load_file(str(tiny_single_file))
    bare = {k.removeprefix(VAE_PREFIX): v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    save_file(bare, str(tmp_path / "bare.safetensors"))
    save_file({VAE_PREFIX + k: v for k, v in bare.items()}, str(tmp_path / "prefixed.safetensors"))
    sources = [tiny_model_dir / "vae", tiny_model_dir, tiny_model_dir / "vae" / "diffusion_pytorch_model.safetensors",
               tmp_path / "bare.safetensors", tmp_path / "prefixed.safetensors"]
    for source in sources:
        assert_same_weights(load_vae(source, config_dir=tiny_model_dir), tiny_pipe.vae)


def test_vae_refuses_what_is_not_a_vae(tiny_model_dir, tmp_path):
    with pytest.raises(ModelError, match="not a VAE.*LoRA"):
        path = tmp_path / "lora.safetensors"
        save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(path))
        load_vae(path, config_dir=tiny_model_dir)
    with pytest.raises(ModelError, match="vae.pt.*allow_pickle"):
        torch.save({}, tmp_path / "vae.pt")
        load_vae(tmp_path / "vae.pt", config_dir=tiny_model_dir)


def test_the_tiny_model_as_one_single_file_opens_by_its_shapes(tmp_path):
    """`finetune tiny-model X.safetensors` writes one SGM file; loading finds the tiny architecture by itself."""
    from finetune.config import ModelConfig
    from finetune.models.load import load_models
    from finetune.models.single_file import save_tiny_single_file
    from finetune.models.tiny import build_tiny_pipeline

    path = save_tiny_single_file(tmp_path / "tiny.safetensors", seed=3)
    assert path.is_file() and not (tmp_path / "tiny").exists()
    models = load_models(ModelConfig(pretrained=path))
    reference = build_tiny_pipeline(seed=3)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(models, name).state_dict(), getattr(reference, name).state_dict()
        assert set(ours) == set(theirs), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


@pytest.mark.slow
def test_a_single_file_model_trains_merges_and_samples_end_to_end(tmp_path):
    import subprocess
    import sys

    from conftest import make_image

    def run(*args):
        done = subprocess.run([sys.executable, "-m", "finetune", *map(str, args)], capture_output=True, text=True,
                              timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done

    run("tiny-model", "tiny.safetensors")
    for i, (h, w) in enumerate([(96, 160), (128, 128)]):
        make_image(tmp_path / "imgs" / f"{i}.png", h, w)
    (tmp_path / "c.toml").write_text(
        '[model]\npretrained = "tiny.safetensors"\n[dataset]\nresolution = 128\nmin_side = 64\nmax_side = 256\n'
        '[[dataset.subsets]]\nfolder = "imgs"\n'
        '[training]\nmax_steps = 2\nmixed_precision = "no"\n[lora]\nrank = 2\n[output]\nname = "lora"\n',
        encoding="utf-8")
    run("train", "c.toml")
    done = run("merge", "--base", "tiny.safetensors", "--lora", "output/lora.safetensors:0.5",
               "--out", "merged.safetensors")
    assert (tmp_path / "merged.safetensors").is_file() and "Traceback" not in done.stderr
    # (sampling a single file with --lora is tests/finetune/tools' and the refiner's two-stage test's job)
