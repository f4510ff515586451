"""A merged model equals base + LoRA: the merged UNet's output matches the adapter applied by diffusers."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from finetune.errors import ModelError
from finetune.tools.merge import merge_loras
from finetune.models.sgm_keys import unet_module_map

MODULES = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
           "mid_block.attentions.0.transformer_blocks.1.attn2.to_k",
           "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_out.0"]


def kohya_lora(unet, path, rank=4, alpha=2.0, seed=0):
    """A kohya-format LoRA on a few attention projections, with random (non-zero) up and down."""
    g = torch.Generator().manual_seed(seed)
    mapping = unet_module_map(dict(unet.config), MODULES)
    modules = dict(unet.named_modules())
    tensors = {}
    for path_ in MODULES:
        weight = modules[path_].weight
        key = "lora_unet_" + mapping[path_].replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, weight.shape[1], generator=g) * 0.1
        tensors[f"{key}.lora_up.weight"] = torch.randn(weight.shape[0], rank, generator=g) * 0.1
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def unet_output(unet):
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 16, 16, generator=g)
    cond = {"encoder_hidden_states": torch.randn(1, 77, unet.config.cross_attention_dim, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(1, 64, generator=g),
                                  "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]])}}
    with torch.no_grad():
        return unet(sample, torch.tensor([300]), **cond).sample


@pytest.mark.slow
def test_merged_folder_equals_base_plus_lora(tmp_path, tiny_model_dir):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    lora = kohya_lora(pipe.unet, tmp_path / "a.safetensors")
    merge_loras(tiny_model_dir, [(lora, 0.7)], tmp_path / "merged")
    pipe.load_lora_weights(str(lora), adapter_name="a")
    pipe.set_adapters(["a"], adapter_weights=[0.7])
    expected = unet_output(pipe.unet)
    merged = UNet2DConditionModel.from_pretrained(tmp_path / "merged" / "unet")
    torch.testing.assert_close(unet_output(merged), expected, rtol=1e-4, atol=1e-5)
    base = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    assert (unet_output(base) - expected).abs().max() > 1e-3  # the LoRA did something


def test_unknown_module_is_refused_and_nothing_written(tmp_path, tiny_model_dir):
    save_file({"lora_unet_no_such_module.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_no_such_module.lora_up.weight": torch.zeros(4, 2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelError, match="no_such_module"):
        merge_loras(tiny_model_dir, [(tmp_path / "bad.safetensors", 1.0)], tmp_path / "out")
    assert not (tmp_path / "out").exists()
