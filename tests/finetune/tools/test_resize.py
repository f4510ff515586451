"""LoRA resize: the truncated SVD of each module's change, from any variant, into a file every client loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from finetune.adapters.modules import LohaModule, LoraModule
from finetune.cli import main
from finetune.errors import ConfigError
from finetune.tools.resize import resize_lora, resize_module


def lora(out_features=48, in_features=40, rank=8, alpha=4.0, kernel=(), seed=0) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, in_features, *kernel, generator=g)
    up = torch.randn(out_features, rank, *(1 for _ in kernel), generator=g)
    return LoraModule(down=down, up=up, alpha=alpha)


def truncated(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.flatten(1).double(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(delta.shape).float()


@pytest.mark.parametrize("kernel", [(), (3, 3)])
def test_resize_is_the_best_low_rank_approximation_of_the_change(kernel):
    module = lora(kernel=kernel)
    same, kept = resize_module(module, 8)
    torch.testing.assert_close(same.low_rank_delta(), module.low_rank_delta(), rtol=1e-4, atol=1e-4)
    assert kept == pytest.approx(1.0)
    small, kept = resize_module(module, 3)
    assert small.rank == 3 and small.alpha == 3.0 and small.up.shape[1] == 3
    assert small.low_rank_delta().shape == module.out_shape
    best = truncated(module.low_rank_delta(), 3)
    torch.testing.assert_close(small.low_rank_delta(), best, rtol=1e-4, atol=1e-3)
    s = torch.linalg.svdvals(module.low_rank_delta().flatten(1).double())
    assert kept == pytest.approx(float(s[:3].square().sum() / s.square().sum()), rel=1e-4)


def test_energy_keeps_the_smallest_rank_that_holds_that_share():
    u, _ = torch.linalg.qr(torch.randn(32, 3, generator=torch.Generator().manual_seed(1)))
    v, _ = torch.linalg.qr(torch.randn(24, 3, generator=torch.Generator().manual_seed(2)))
    s = torch.tensor([10.0, 1.0, 0.1])  # squared shares: 0.990001, 0.0099, 0.0001
    module = LoraModule(down=v.T.contiguous(), up=u * s, alpha=3.0)
    assert resize_module(module, 3, energy=0.99)[0].rank == 1
    assert resize_module(module, 3, energy=0.995)[0].rank == 2
    assert resize_module(module, 3, energy=1.0)[0].rank == 3
    assert resize_module(module, 2, energy=1.0)[0].rank == 2  # --rank caps the energy's choice


def test_loha_becomes_an_equivalent_lora_and_dora_keeps_its_magnitude():
    g = torch.Generator().manual_seed(3)
    loha = LohaModule(*(torch.randn(shape, generator=g) for shape in [(16, 2), (2, 12), (16, 2), (2, 12)]), alpha=2.0)
    as_lora, kept = resize_module(loha, 4)  # a rank-2 ⊙ rank-2 product has rank ≤ 4: nothing is lost
    torch.testing.assert_close(as_lora.low_rank_delta(), loha.delta(), rtol=1e-4, atol=1e-4)
    assert kept == pytest.approx(1.0)
    dora = lora()
    dora.dora_scale = torch.rand(48, 1, generator=g)
    assert resize_module(dora, 2)[0].dora_scale is dora.dora_scale


def trained_lora_file(path, dtype=torch.float32):
    from finetune.adapters.inject import add_unet_adapter
    from finetune.adapters.save import save_adapter
    from finetune.config import LoraConfig
    from finetune.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    add_unet_adapter(pipe.unet, LoraConfig(rank=4, alpha=2.0))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return save_adapter(path, pipe.unet, metadata={"ss_network_dim": "4", "ss_output_name": "mine"}, dtype=dtype)


def unet_output(lora_path=None):
    from finetune.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    if lora_path is not None:
        pipe.load_lora_weights(str(lora_path))
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    cond = {"encoder_hidden_states": torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(1, 64, generator=g),
                                  "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}
    with torch.no_grad():
        return pipe.unet(sample, torch.tensor([500]), **cond).sample


@pytest.mark.slow
def test_resized_file_loads_in_diffusers_with_the_same_or_a_close_effect(tmp_path):
    source = trained_lora_file(tmp_path / "r4.safetensors")
    base, expected = unet_output(), unet_output(source)
    same = resize_lora(source, tmp_path / "same.safetensors", 4)
    torch.testing.assert_close(unet_output(same.out), expected, rtol=1e-4, atol=1e-5)

    small = resize_lora(source, tmp_path / "r2.safetensors", 2)
    tensors = load_file(str(small.out))
    assert {v.shape[0] for k, v in tensors.items() if k.endswith(".lora_down.weight")} == {2}
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {2.0}
    assert set(load_file(str(source))) == set(tensors)  # the same kohya keys
    # Half the rank keeps most of the effect: much closer to the rank-4 LoRA than the base is.
    assert (unet_output(small.out) - expected).norm() < 0.7 * (base - expected).norm()
    assert 0.5 < min(small.energy.values()) < 1.0
    with safe_open(str(small.out), "pt") as fh:
        metadata = fh.metadata()
    assert metadata["ss_network_dim"] == "2" and metadata["ss_output_name"] == "mine"  # the rest carried over
    assert json.loads(metadata["resized"])["rank"] == 2


@pytest.mark.slow
def test_a_diffusers_file_resizes_to_kohya_keys_without_its_peft_header(tmp_path):
    from finetune.adapters.convert import convert_lora

    source = trained_lora_file(tmp_path / "r4.safetensors")
    diffusers = convert_lora(source, tmp_path / "d.safetensors", to="diffusers")
    out = resize_lora(diffusers, tmp_path / "r4k.safetensors", 4).out
    assert set(load_file(str(out))) == set(load_file(str(source)))
    with safe_open(str(out), "pt") as fh:
        assert "lora_adapter_metadata" not in fh.metadata()
    torch.testing.assert_close(unet_output(out), unet_output(source), rtol=1e-4, atol=1e-5)


def test_resize_keeps_the_files_precision(tmp_path):
    source = trained_lora_file(tmp_path / "half.safetensors", dtype=torch.float16)
    tensors = load_file(str(resize_lora(source, tmp_path / "r2.safetensors", 2).out))
    assert {v.dtype for k, v in tensors.items() if not k.endswith(".alpha")} == {torch.float16}


def test_cli_resize_and_its_refusals(tmp_path, capsys):
    source = trained_lora_file(tmp_path / "r4.safetensors")
    assert main(["resize", str(source), "--rank", "2", "--energy", "0.9", "--out", str(tmp_path / "o.safetensors")]) == 0
    assert "written" in capsys.readouterr().out and (tmp_path / "o.safetensors").is_file()
    assert main(["resize", str(source), "--rank", "0", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--rank 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--energy 1.5"):
        resize_lora(source, tmp_path / "x.safetensors", 2, energy=1.5)
    with pytest.raises(ConfigError, match="is the input"):
        resize_lora(source, source, 2)
    save_file({"lora_unet_nothing_here.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "bad.safetensors"))
    assert main(["resize", str(tmp_path / "bad.safetensors"), "--rank", "2", "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "bad.safetensors" in capsys.readouterr().err  # the reader names the file and its unknown keys
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()
