"""LoRA extraction: a known low-rank difference comes back whole, and merges back into the tuned model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from finetune.errors import ModelError
from finetune.tools.extract import extract_lora, low_rank
from finetune.tools.merge import merge_loras

# kohya name -> (out, in) of tiny-model modules: UNet attention, text encoder 1, text encoder 2 (fused qkv).
CHANGED = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (64, 64),
    "lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_v": (64, 96),
    "lora_te1_text_model_encoder_layers_1_self_attn_v_proj": (32, 32),
    "lora_te2_text_model_encoder_layers_2_self_attn_k_proj": (64, 64),
}
FF = {"lora_unet_middle_block_1_transformer_blocks_0_ff_net_2": (128, 512)}


def write_kohya_lora(path: Path, modules: dict, rank: int = 3, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out_features, in_features) in modules.items():
        state[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=gen) * 0.3
        state[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=gen) * 0.3
        state[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(path))
    return path


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every weight of a folder (keyed by relative file and key) or a single file."""
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    out = {}
    for file in files:
        with safe_open(str(file), "pt") as fh:
            out.update({f"{file.name}:{k}": fh.get_tensor(k).float() for k in fh.keys()})
    return out


def assert_models_close(a: Path, b: Path, rel: float = 1e-4) -> None:
    ta, tb = tensors(a), tensors(b)
    assert set(ta) == set(tb)
    for key in ta:
        assert (ta[key] - tb[key]).norm() <= rel * tb[key].norm() + 1e-7, key


# --- the SVD -------------------------------------------------------------------------------------

def test_low_rank_recovers_an_exactly_low_rank_matrix():
    gen = torch.Generator().manual_seed(0)
    matrix = torch.randn(40, 3, generator=gen) @ torch.randn(3, 30, generator=gen)
    up, down, energy = low_rank(matrix, rank=3)
    assert up.shape == (40, 3) and down.shape == (3, 30)
    assert energy == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(up @ down, matrix, atol=1e-4)


def test_low_rank_energy_is_the_kept_share_of_squared_singular_values():
    matrix = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    up, down, energy = low_rank(matrix, rank=1)
    assert energy == pytest.approx(9 / 14)
    assert torch.allclose(up @ down, torch.diag(torch.tensor([3.0, 0, 0])), atol=1e-5)


def test_low_rank_big_matrix_uses_the_randomized_path_accurately():
    gen = torch.Generator().manual_seed(1)
    matrix = torch.randn(300, 4, generator=gen) @ torch.randn(4, 200, generator=gen)
    up, down, energy = low_rank(matrix, rank=4)
    assert energy == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(up @ down, matrix, atol=1e-3)


def test_low_rank_conv_gives_conv_lora_shapes():
    gen = torch.Generator().manual_seed(2)
    weight = (torch.randn(8, 2, generator=gen) @ torch.randn(2, 4 * 9, generator=gen)).reshape(8, 4, 3, 3)
    up, down, energy = low_rank(weight, rank=2)
    assert up.shape == (8, 2, 1, 1) and down.shape == (2, 4, 3, 3)
    assert energy == pytest.approx(1.0, abs=1e-6)


# --- on the tiny model ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tuned_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with a known rank-3 change on four modules (made by merging a LoRA)."""
    folder = tmp_path_factory.mktemp("tuned")
    lora = write_kohya_lora(folder / "change.safetensors", {**CHANGED, **FF})
    return merge_loras(tiny_model_dir, [(lora, 1.0)], folder / "tuned").out


def test_extract_recovers_the_change_and_merges_back(tiny_model_dir, tuned_dir, tmp_path):
    out = tmp_path / "extracted.safetensors"
    report = extract_lora(tiny_model_dir, tuned_dir, rank=3, out=out)
    assert set(report.energy) == set(CHANGED)  # the feed-forward change is not an "attn" target
    assert all(value == pytest.approx(1.0, abs=1e-5) for value in report.energy.values())
    assert report.skipped > 0
    merge_loras(tiny_model_dir, [(out, 1.0)], tmp_path / "remerged")
    # Everything but the untargeted feed-forward weight comes back.
    ff_key = "diffusion_pytorch_model.safetensors:mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight"
    remerged, tuned = tensors(tmp_path / "remerged"), tensors(tuned_dir)
    for key in tuned:
        if key != ff_key:
            assert (remerged[key] - tuned[key]).norm() <= 1e-4 * tuned[key].norm() + 1e-7, key


def test_linear_targets_include_feed_forward(tiny_model_dir, tuned_dir, tmp_path):
    out = tmp_path / "extracted.safetensors"
    report = extract_lora(tiny_model_dir, tuned_dir, rank=3, out=out, targets="linear")
    assert set(report.energy) == set(CHANGED) | set(FF)
    merge_loras(tiny_model_dir, [(out, 1.0)], tmp_path / "remerged")
    assert_models_close(tmp_path / "remerged", tuned_dir)


@pytest.mark.slow
def test_extract_from_single_files_and_mixed_layouts(tiny_model_dir, tuned_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from finetune.models.single_file import save_single_file

    base_file = save_single_file(StableDiffusionXLPipeline.from_pretrained(tiny_model_dir), tmp_path / "base.safetensors")
    tuned_file = save_single_file(StableDiffusionXLPipeline.from_pretrained(tuned_dir), tmp_path / "tuned.safetensors")
    from_files = extract_lora(base_file, tuned_file, rank=3, out=tmp_path / "a.safetensors")
    mixed = extract_lora(tiny_model_dir, tuned_file, rank=3, out=tmp_path / "b.safetensors")
    assert set(from_files.energy) == set(mixed.energy) == set(CHANGED)
    merge_loras(base_file, [(tmp_path / "a.safetensors", 1.0)], tmp_path / "remerged.safetensors")
    remerged, tuned = load_file(str(tmp_path / "remerged.safetensors")), load_file(str(tuned_file))
    assert set(remerged) == set(tuned)
    for key, value in remerged.items():
        if ".ff.net.2." not in key:
            assert (value - tuned[key]).norm() <= 1e-4 * tuned[key].norm() + 1e-7, key


def test_low_rank_truncation_reports_partial_energy(tiny_model_dir, tuned_dir, tmp_path):
    report = extract_lora(tiny_model_dir, tuned_dir, rank=1, out=tmp_path / "r1.safetensors")
    assert all(0.2 < value < 0.99 for value in report.energy.values())
    with safe_open(str(tmp_path / "r1.safetensors"), "pt") as fh:
        assert fh.metadata()["ss_network_dim"] == "1"
        assert fh.get_tensor("lora_te1_text_model_encoder_layers_1_self_attn_v_proj.lora_down.weight").shape == (1, 32)


def test_bad_arguments_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ModelError, match="targets = 'everything'"):
        extract_lora(tiny_model_dir, tiny_model_dir, 4, tmp_path / "x.safetensors", targets="everything")
    with pytest.raises(ModelError, match="nope: checkpoint not found"):
        extract_lora(tiny_model_dir, tmp_path / "nope", 4, tmp_path / "x.safetensors")
    report = extract_lora(tiny_model_dir, tiny_model_dir, 4, tmp_path / "same.safetensors")
    assert report.energy == {} and "no target weight differs" in str(report)


def test_all_targets_extract_conv_changes_as_conv_loras(tiny_model_dir, tmp_path):
    # A kxk conv LoRA on the first ResNet's conv1 (down_blocks.0.resnets.0.conv1: 32 -> 32, 3x3).
    gen = torch.Generator().manual_seed(3)
    name = "lora_unet_input_blocks_1_0_in_layers_2"
    save_file({f"{name}.lora_down.weight": torch.randn(2, 32, 3, 3, generator=gen) * 0.1,
               f"{name}.lora_up.weight": torch.randn(32, 2, 1, 1, generator=gen) * 0.1,
               f"{name}.alpha": torch.tensor(2.0)}, str(tmp_path / "conv.safetensors"))
    tuned = merge_loras(tiny_model_dir, [(tmp_path / "conv.safetensors", 1.0)], tmp_path / "tuned").out
    assert extract_lora(tiny_model_dir, tuned, 2, tmp_path / "attn.safetensors").energy == {}
    report = extract_lora(tiny_model_dir, tuned, 2, tmp_path / "all.safetensors", targets="all")
    assert list(report.energy) == [name] and report.energy[name] == pytest.approx(1.0, abs=1e-5)
    merge_loras(tiny_model_dir, [(tmp_path / "all.safetensors", 1.0)], tmp_path / "remerged")
    assert_models_close(tmp_path / "remerged", tuned)
