"""Merging LoRAs: the math, both checkpoint layouts, byte-identical pass-through and the refusals."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from finetune.errors import ModelError
from finetune.adapters.modules import LoraModule
from finetune.tools.merge import merge_loras, read_header

# kohya name -> (out, in) of a few tiny-model modules in all three components.
TINY_MODULES = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (64, 64),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (64, 96),
    "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_out_0": (128, 128),
    "lora_unet_output_blocks_3_1_proj_in": (64, 64),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (32, 32),
    "lora_te1_text_model_encoder_layers_2_mlp_fc1": (64, 32),
    "lora_te2_text_model_encoder_layers_1_self_attn_k_proj": (64, 64),
    "lora_te2_text_model_encoder_layers_0_mlp_fc2": (64, 128),
}
# The same modules by their diffusers / transformers paths, written out by hand so the reference
# merge below does not share the name tables under test.
MODULE_PATHS = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
    "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_out_0": ("unet", "mid_block.attentions.0.transformer_blocks.1.attn2.to_out.0"),
    "lora_unet_output_blocks_3_1_proj_in": ("unet", "up_blocks.1.attentions.0.proj_in"),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ("text_encoder", "encoder.layers.0.self_attn.q_proj"),
    "lora_te1_text_model_encoder_layers_2_mlp_fc1": ("text_encoder", "encoder.layers.2.mlp.fc1"),
    "lora_te2_text_model_encoder_layers_1_self_attn_k_proj": ("text_encoder_2", "text_model.encoder.layers.1.self_attn.k_proj"),
    "lora_te2_text_model_encoder_layers_0_mlp_fc2": ("text_encoder_2", "text_model.encoder.layers.0.mlp.fc2"),
}


def write_kohya_lora(path: Path, modules: dict, rank: int = 4, alpha: float = 2.0, seed: int = 0,
                     std: float = 0.3) -> Path:
    """A kohya-keyed LoRA with random up and down matrices (both non-zero so the merge shows)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out_features, in_features) in modules.items():
        state[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=gen) * std
        state[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=gen) * std
        state[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return path


def unet_output(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 16, 16, generator=gen)
    context = torch.randn(1, 8, unet.config.cross_attention_dim, generator=gen)
    added = {"text_embeds": torch.randn(1, 64, generator=gen), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=context, added_cond_kwargs=added).sample


def text_outputs(pipe) -> list[torch.Tensor]:
    ids = torch.tensor([[49406, 320, 1125, 539, 49407]])
    with torch.no_grad():
        return [enc(ids, output_hidden_states=True).hidden_states[-2] for enc in (pipe.text_encoder, pipe.text_encoder_2)]


def load_folder(path: Path) -> SimpleNamespace:
    """The tiny model's UNet, VAE and text encoders from a diffusers folder (the parts a merge touches)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return SimpleNamespace(
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"),
    )


def merged_by_hand(base_dir: Path, lora_file: Path, scale: float) -> SimpleNamespace:
    """weight += scale · alpha/rank · up @ down on every module of the file, done on the loaded models."""
    parts = load_folder(base_dir)
    state = load_file(str(lora_file))
    for name, (part, path) in MODULE_PATHS.items():
        up, down = state[f"{name}.lora_up.weight"], state[f"{name}.lora_down.weight"]
        alpha = float(state[f"{name}.alpha"])
        with torch.no_grad():
            getattr(parts, part).get_submodule(path).weight += scale * alpha / down.shape[0] * (up @ down)
    return parts


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    assert (actual - expected).norm() <= rel * expected.norm()


# --- the math (LoraModule.low_rank_delta, the formula merge applies) ---------------------------------

def lora_delta(up, down, alpha, scale=1.0):
    return LoraModule(down=down, up=up, alpha=alpha).low_rank_delta(scale)


def test_lora_delta_linear_is_scaled_up_at_down():
    up, down = torch.randn(6, 2), torch.randn(2, 5)
    expected = 0.5 * (3.0 / 2) * (up @ down)
    assert torch.allclose(lora_delta(up, down, alpha=3.0, scale=0.5), expected)


def test_lora_delta_conv_kernels_match_two_convolutions():
    up, down = torch.randn(6, 3, 1, 1), torch.randn(3, 4, 3, 3)
    x = torch.randn(1, 4, 9, 9)
    two_steps = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down, padding=1), up)
    delta = lora_delta(up, down, alpha=3.0, scale=1.0)
    assert delta.shape == (6, 4, 3, 3)
    assert torch.allclose(torch.nn.functional.conv2d(x, delta, padding=1), two_steps, atol=1e-5)


def test_lora_delta_is_fp32_for_half_inputs():
    assert lora_delta(torch.randn(4, 2).half(), torch.randn(2, 4).half(), 2.0).dtype == torch.float32


# --- diffusers folder ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> Path:
    return write_kohya_lora(tmp_path_factory.mktemp("lora") / "tiny.safetensors", TINY_MODULES)


@pytest.mark.slow
def test_folder_merge_equals_base_plus_lora_on_a_fixed_input(tiny_model_dir, lora_file, tmp_path):
    merged_dir = tmp_path / "merged"
    report = merge_loras(tiny_model_dir, [(lora_file, 0.7)], merged_dir)
    assert len(report.merged[str(lora_file)]) == len(TINY_MODULES)

    merged, reference = load_folder(merged_dir), merged_by_hand(tiny_model_dir, lora_file, 0.7)
    assert_close(unet_output(merged.unet), unet_output(reference.unet))
    for actual, expected in zip(text_outputs(merged), text_outputs(reference)):
        assert_close(actual, expected)
    base = load_folder(tiny_model_dir)
    assert not torch.allclose(unet_output(base.unet), unet_output(merged.unet), atol=1e-4)
    assert not torch.allclose(text_outputs(base)[1], text_outputs(merged)[1], atol=1e-4)


def test_folder_merge_copies_untouched_files_and_tensors_bytes(tiny_model_dir, lora_file, tmp_path):
    merged_dir = tmp_path / "merged"
    only_unet = write_kohya_lora(tmp_path / "unet.safetensors", {k: v for k, v in TINY_MODULES.items() if "unet" in k})
    merge_loras(tiny_model_dir, [(only_unet, 1.0)], merged_dir)
    for rel in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "model_index.json",
                "tokenizer/tokenizer.json", "unet/config.json"):
        assert (merged_dir / rel).read_bytes() == (tiny_model_dir / rel).read_bytes(), rel
    unet = "unet/diffusion_pytorch_model.safetensors"
    changed = _changed_tensors(tiny_model_dir / unet, merged_dir / unet)
    assert changed == {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                       "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                       "mid_block.attentions.0.transformer_blocks.1.attn2.to_out.0.weight",
                       "up_blocks.1.attentions.0.proj_in.weight"}
    assert read_header(merged_dir / unet)[1] == read_header(tiny_model_dir / unet)[1]


def _changed_tensors(a: Path, b: Path) -> set[str]:
    """Keys whose raw bytes differ; the key sets and dtypes must agree."""
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert set(fa.keys()) == set(fb.keys())
        changed = set()
        for key in fa.keys():
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            assert x.dtype == y.dtype and x.shape == y.shape
            if not torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)):
                changed.add(key)
    return changed


def test_folder_merge_keeps_half_precision(tiny_model_dir, lora_file, tmp_path):
    half = tmp_path / "half"
    merge_loras(tiny_model_dir, [], half, dtype=torch.float16)
    merged = tmp_path / "merged"
    merge_loras(half, [(lora_file, 1.0)], merged)
    with safe_open(str(merged / "unet/diffusion_pytorch_model.safetensors"), "pt") as fh:
        assert fh.get_tensor("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight").dtype == torch.float16
        assert fh.get_tensor("conv_in.weight").dtype == torch.float16


def test_cli_merge_writes_the_precision_asked_for(tiny_model_dir, lora_file, tmp_path):
    from finetune.cli import main

    out = tmp_path / "merged"
    assert main(["merge", "--base", str(tiny_model_dir), "--lora", f"{lora_file}:0.5", "--out", str(out),
                 "--dtype", "bf16"]) == 0
    with safe_open(str(out / "unet/diffusion_pytorch_model.safetensors"), "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}


def test_two_loras_add_up(tiny_model_dir, tmp_path):
    first = write_kohya_lora(tmp_path / "a.safetensors", TINY_MODULES, seed=1)
    second = write_kohya_lora(tmp_path / "b.safetensors", TINY_MODULES, seed=2)
    merge_loras(tiny_model_dir, [(first, 0.5), (second, -1.0)], tmp_path / "both")
    merge_loras(tiny_model_dir, [(first, 0.5)], tmp_path / "one")
    merge_loras(tmp_path / "one", [(second, -1.0)], tmp_path / "two")
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    rel = "unet/diffusion_pytorch_model.safetensors"
    with safe_open(str(tmp_path / "both" / rel), "pt") as a, safe_open(str(tmp_path / "two" / rel), "pt") as b:
        assert torch.allclose(a.get_tensor(key), b.get_tensor(key), atol=1e-6)


# --- single file ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_single_file(tiny_model_dir, tmp_path_factory) -> Path:
    from finetune.models.single_file import save_single_file

    return save_single_file(load_folder(tiny_model_dir), tmp_path_factory.mktemp("single") / "tiny.safetensors",
                            metadata={"modelspec.title": "tiny", "ss_note": "kept"})


def test_single_file_merge_equals_base_plus_lora(tiny_model_dir, tiny_single_file, lora_file, tmp_path):
    from finetune.models.single_file import sgm_state_dict

    merge_loras(tiny_single_file, [(lora_file, 0.7)], tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    # Our SGM writer round-trips through diffusers (tests/finetune/models/test_single_file.py), so the
    # hand-merged models written in SGM names are the expected file, tensor by tensor.
    expected = sgm_state_dict(merged_by_hand(tiny_model_dir, lora_file, 0.7))
    assert set(merged) == set(expected)
    for key, tensor in expected.items():
        assert_close(merged[key], tensor, rel=1e-6)


def test_single_file_merge_keeps_keys_metadata_and_untouched_bytes(tiny_single_file, lora_file, tmp_path):
    out = tmp_path / "merged.safetensors"
    merge_loras(tiny_single_file, [(lora_file, 1.0)], out)
    assert read_header(out)[1] == {"format": "pt", "modelspec.title": "tiny", "ss_note": "kept"}
    te2 = "conditioner.embedders.1.model.transformer.resblocks"
    assert _changed_tensors(tiny_single_file, out) == {
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.1.attn2.to_out.0.weight",
        "model.diffusion_model.output_blocks.3.1.proj_in.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.2.mlp.fc1.weight",
        f"{te2}.1.attn.in_proj_weight",
        f"{te2}.0.mlp.c_proj.weight",
    }
    # k_proj is the middle third of the fused in_proj_weight: q and v rows stay as they were.
    with safe_open(str(tiny_single_file), "pt") as a, safe_open(str(out), "pt") as b:
        before, after = a.get_tensor(f"{te2}.1.attn.in_proj_weight"), b.get_tensor(f"{te2}.1.attn.in_proj_weight")
    assert torch.equal(before[:64], after[:64]) and torch.equal(before[128:], after[128:])
    assert not torch.equal(before[64:128], after[64:128])


def test_single_file_merge_in_bf16_stays_bf16(tiny_single_file, lora_file, tmp_path):
    half = tmp_path / "bf16.safetensors"
    merge_loras(tiny_single_file, [], half, dtype=torch.bfloat16)
    merge_loras(half, [(lora_file, 1.0)], tmp_path / "merged.safetensors")
    with safe_open(str(tmp_path / "merged.safetensors"), "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}


# --- refusals ------------------------------------------------------------------------------------

def test_unmatched_module_is_an_error_listing_it(tiny_model_dir, tmp_path):
    # input_blocks.7 has transformer_blocks.9 in real SDXL, but not in the tiny model.
    lora = write_kohya_lora(tmp_path / "sdxl.safetensors",
                            {"lora_unet_input_blocks_7_1_transformer_blocks_9_attn1_to_q": (128, 128)})
    with pytest.raises(ModelError, match="transformer_blocks.9.attn1.to_q") as err:
        merge_loras(tiny_model_dir, [(lora, 1.0)], tmp_path / "out")
    assert "sdxl.safetensors" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_the_weight(tiny_model_dir, tmp_path):
    # An SD1.5-sized update (cross-attention width 768) on an SDXL module.
    lora = write_kohya_lora(tmp_path / "sd15.safetensors",
                            {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (64, 768)})
    with pytest.raises(ModelError, match=r"attn2\.to_k\.weight has shape \(64, 96\).*\(64, 768\)"):
        merge_loras(tiny_model_dir, [(lora, 1.0)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_finite_merge_names_the_adapter_and_writes_nothing(tiny_model_dir, tmp_path):
    lora = write_kohya_lora(tmp_path / "broken.safetensors", TINY_MODULES, std=1e30)
    with pytest.raises(ModelError, match="broken.safetensors.*non-finite"):
        merge_loras(tiny_model_dir, [(lora, 1.0)], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_missing_base_and_pickled_base_are_refused(lora_file, tmp_path):
    with pytest.raises(ModelError, match="not found"):
        merge_loras(tmp_path / "nope", [(lora_file, 1.0)], tmp_path / "out")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04")
    with pytest.raises(ModelError, match="model.ckpt"):
        merge_loras(ckpt, [(lora_file, 1.0)], tmp_path / "out.safetensors")


@pytest.mark.slow
def test_a_safetensors_out_path_writes_one_single_file_whatever_the_bases_layout(tmp_path, tiny_model_dir, lora_file):
    """A user merging onto a diffusers base with --out merged.safetensors gets the file A1111/ComfyUI open,
    not a folder named merged.safetensors; a folder out path from a single file gets a diffusers folder."""
    from finetune.models.single_file import load_single_file_pipeline, read_shapes

    lora = lora_file
    out = tmp_path / "merged.safetensors"
    merge_loras(tiny_model_dir, [(lora, 1.0)], out)
    assert out.is_file() and "model.diffusion_model.input_blocks.0.0.weight" in read_shapes(out)
    merged_unet = load_single_file_pipeline(out).unet
    folder = tmp_path / "merged-folder"
    merge_loras(tiny_model_dir, [(lora, 1.0)], folder)
    from diffusers import UNet2DConditionModel

    reference = UNet2DConditionModel.from_pretrained(folder / "unet")
    for (name, a), (_, b) in zip(merged_unet.state_dict().items(), reference.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    back = tmp_path / "back"
    merge_loras(out, [(lora, 0.0)], back)
    assert (back / "model_index.json").is_file() and (back / "unet" / "config.json").is_file()
    assert not list(tmp_path.glob(".merged*"))  # the work folders are gone


@pytest.mark.slow  # builds or loads two pipelines
def test_bundled_words_join_a_folders_tokenizers_and_sit_beside_a_single_file(tiny_model_dir, tiny_single_file, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    words = {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 64)}
    state = load_file(str(write_kohya_lora(tmp_path / "pivotal.safetensors", TINY_MODULES)))
    state.update({f"bundle_emb.<myDog>.{k}": v for k, v in words.items()})
    save_file(state, str(tmp_path / "pivotal.safetensors"))

    report = merge_loras(tiny_model_dir, [(tmp_path / "pivotal.safetensors", 0.5)], tmp_path / "folder")
    assert "<myDog>: 2 vector(s) added" in str(report)
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "folder", local_files_only=True)
    for tokenizer, encoder, key in ((pipe.tokenizer, pipe.text_encoder, "clip_l"),
                                    (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")):
        assert tokenizer("<myDog> <myDog>_1").input_ids == [49406, 49408, 49409, 49407]
        assert torch.equal(encoder.get_input_embeddings().weight[49408:], words[key])  # scale applies to the LoRA only
        assert encoder.config.eos_token_id == 49407  # pooling at <|endoftext|>, not at the largest id

    report = merge_loras(tiny_single_file, [(tmp_path / "pivotal.safetensors", 1.0)], tmp_path / "one.safetensors")
    assert "cannot hold a tokenizer" in str(report)
    beside = load_file(str(tmp_path / "embeddings" / "myDog.safetensors"))
    assert all(torch.equal(beside[k], words[k]) for k in words)
