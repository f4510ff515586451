"""Saved adapters load in diffusers with the training effect; files from other tools read back; conversion.

The reference for "the same effect" is the in-training peft model: diffusers' `load_lora_weights`
on a fresh pipeline must reproduce its UNet and text-encoder outputs, with no unexpected or missing
keys reported.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from finetune.adapters.convert import convert_lora
from finetune.adapters.inject import add_text_encoder_adapters, add_unet_adapter
from finetune.adapters.load import load_adapter_weights
from finetune.adapters.metadata import adapter_metadata
from finetune.adapters.read import read_lora
from finetune.adapters.save import adapter_layers, save_adapter
from finetune.config import LoraConfig
from finetune.errors import ConfigError, ModelError
from finetune.models.tiny import build_tiny_pipeline, tiny_text_configs


def randomise_adapters(models, seed=0):
    """Stand-in for training: every adapter weight non-zero (so lora_B/up carry values)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in models:
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                noise = torch.randn(p.shape, generator=g)
                if "magnitude" in name:
                    p.mul_(1 + 0.1 * noise)  # DoRA magnitudes: near the weight norms they start at
                else:
                    p.copy_(noise * 0.05)


def trained_pipe(cfg: LoraConfig, text_encoders=True, seed=0):
    pipe = build_tiny_pipeline(seed=0)
    add_unet_adapter(pipe.unet, cfg)
    models = [pipe.unet]
    if text_encoders:
        add_text_encoder_adapters((pipe.text_encoder, pipe.text_encoder_2), cfg)
        models += [pipe.text_encoder, pipe.text_encoder_2]
    randomise_adapters(models, seed)
    return pipe


def outputs(pipe):
    """UNet prediction and both encoders' penultimate states on fixed inputs."""
    g = torch.Generator().manual_seed(3)
    unet = pipe.unet
    sample = torch.randn(1, 4, 8, 8, generator=g)
    cond = {"encoder_hidden_states": torch.randn(1, 77, unet.config.cross_attention_dim, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(1, 64, generator=g),
                                  "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}
    ids = torch.randint(0, 1000, (1, 77), generator=g)
    with torch.no_grad():
        result = [unet(sample, torch.tensor([500]), **cond).sample]
        for encoder in (pipe.text_encoder, pipe.text_encoder_2):
            result.append(encoder(ids, output_hidden_states=True).hidden_states[-2])
    return result


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def diffusers_load(path):
    """A fresh pipeline with `path` loaded by diffusers; returns it and every warning diffusers/peft gave."""
    pipe = build_tiny_pipeline(seed=0)
    handler = Captured()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path))
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    messages = handler.messages + [str(w.message) for w in caught]
    return pipe, [m for m in messages if any(s in m.lower() for s in ("unexpected", "missing", "not loaded", "dora"))]


# locon holds every module of the other presets (attn ⊂ attn_ff ⊂ locon); DoRA in the diffusers
# format is covered below.
@pytest.mark.parametrize(("fmt", "targets"), [("kohya", "locon"), ("diffusers", "attn_ff")])
def test_diffusers_loads_the_file_with_the_training_effect(tmp_path, targets, fmt):
    pipe = trained_pipe(LoraConfig(rank=4, alpha=2.0, targets=targets))
    expected = outputs(pipe)
    path = save_adapter(tmp_path / "a.safetensors", pipe.unet, (pipe.text_encoder, pipe.text_encoder_2), fmt=fmt,
                        metadata={"ss_network_dim": "4"})
    fresh, problems = diffusers_load(path)
    assert problems == []
    for got, want in zip(outputs(fresh), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    base = outputs(build_tiny_pipeline(seed=0))
    assert not torch.allclose(base[0], expected[0], atol=1e-4)  # the adapter does change the output


def test_kohya_file_keys_alpha_metadata_and_dtype(tmp_path):
    pipe = trained_pipe(LoraConfig(rank=4, alpha=3.0, targets="attn_ff"))
    meta = adapter_metadata(base_model="tiny", base_model_hash=None, method="lora", variant="lora", rank=4,
                            alpha=3.0, resolution=64, steps=10, epochs=1, dataset_size=6,
                            buckets=[(64, 64)], tag_frequencies={"cat": 2}, config_hash="abc", title="t")
    path = save_adapter(tmp_path / "a.safetensors", pipe.unet, (pipe.text_encoder, pipe.text_encoder_2),
                        metadata=meta)
    with safe_open(str(path), framework="pt") as fh:
        header = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    assert all(isinstance(v, str) for v in meta.values())
    assert {"modelspec.date", "modelspec.implementation", "modelspec.title", "modelspec.resolution",
            "ss_base_model_version", "ss_tag_frequency"} <= set(header)
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert header["ss_network_alpha"] == "3.0" and header["ss_network_dim"] == "4"
    names = {k.split(".")[0] for k in tensors}
    assert {n[:9] for n in names} == {"lora_unet", "lora_te1_", "lora_te2_"}
    assert all(n.startswith(("lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_"))
               for n in names if n.startswith("lora_te"))
    for name in names:
        assert {k for k in tensors if k.startswith(name + ".")} == {
            f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
        assert tensors[f"{name}.alpha"].item() == 3.0 and tensors[f"{name}.alpha"].dim() == 0
        assert tensors[f"{name}.lora_down.weight"].dtype == torch.float32
    half = load_file(str(save_adapter(tmp_path / "h.safetensors", pipe.unet, dtype=torch.float16)))
    assert {v.dtype for k, v in half.items() if not k.endswith(".alpha")} == {torch.float16}


def test_kohya_and_diffusers_round_trip_bitwise_with_text_encoders_and_dora(tmp_path):
    pipe = trained_pipe(LoraConfig(rank=4, alpha=2.0, targets="locon", variant="dora", block_ranks={"mid_block": 2}))
    kohya = save_adapter(tmp_path / "k.safetensors", pipe.unet, (pipe.text_encoder, pipe.text_encoder_2),
                         metadata={"ss_network_dim": "4"})
    diffusers = convert_lora(kohya, tmp_path / "d.safetensors", to="diffusers")
    back = convert_lora(diffusers, tmp_path / "k2.safetensors", to="kohya")
    a, b = load_file(str(kohya)), load_file(str(back))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith(".dora_scale") for k in a)
    again = convert_lora(back, tmp_path / "d2.safetensors", to="diffusers")
    c, d = load_file(str(diffusers)), load_file(str(again))
    assert c.keys() == d.keys() and all(torch.equal(c[k], d[k]) for k in c)
    with safe_open(str(back), framework="pt") as fh:
        assert fh.metadata()["ss_network_dim"] == "4"  # the metadata travels with the tensors


@pytest.mark.slow
def test_dora_diffusers_file_reproduces_training_and_kohya_file_reads_the_same(tmp_path):
    pipe = trained_pipe(LoraConfig(rank=4, alpha=2.0, targets="locon", variant="dora"))
    expected = outputs(pipe)
    direct = save_adapter(tmp_path / "d.safetensors", pipe.unet, (pipe.text_encoder, pipe.text_encoder_2),
                          fmt="diffusers")
    fresh, problems = diffusers_load(direct)
    assert problems == []
    for got, want in zip(outputs(fresh), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    kohya = save_adapter(tmp_path / "k.safetensors", pipe.unet, (pipe.text_encoder, pipe.text_encoder_2))
    te = tuple(tiny_text_configs())
    from_kohya = read_lora(kohya, unet_config=dict(pipe.unet.config), text_configs=te).modules
    from_diffusers = read_lora(direct, unet_config=dict(pipe.unet.config), text_configs=te).modules
    assert from_kohya.keys() == from_diffusers.keys()
    for key, m in from_kohya.items():
        other = from_diffusers[key]
        assert torch.equal(m.down, other.down) and torch.equal(m.up, other.up) and m.alpha == other.alpha
        assert torch.equal(m.dora_scale, other.dora_scale)


def test_diffusers_format_refuses_loha(tmp_path):
    pipe = trained_pipe(LoraConfig(rank=2, variant="loha"), text_encoders=False)
    with pytest.raises(ConfigError, match="kohya"):
        save_adapter(tmp_path / "x.safetensors", pipe.unet, fmt="diffusers")
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(ConfigError, match="format"):
        save_adapter(tmp_path / "x.safetensors", pipe.unet, fmt="comfy")


# --- files written by other tools ------------------------------------------------------------------

def reference_modules(pipe):
    te = tuple(tiny_text_configs())
    path_modules = {}
    for component, model in (("unet", pipe.unet), ("te1", pipe.text_encoder), ("te2", pipe.text_encoder_2)):
        for name, layer in adapter_layers(model):
            path = name if component == "unet" or name.startswith("text_model.") else f"text_model.{name}"
            path_modules[(component, path)] = layer
    return te, path_modules


def other_tool_files(tmp_path, pipe):
    """The same adapter written the ways kohya (old names), OneTrainer and old diffusers write it."""
    from peft.utils import get_peft_model_state_dict

    kohya_old, processor, lora_dot = {}, {}, {}
    for component, model in (("unet", pipe.unet), ("te1", pipe.text_encoder), ("te2", pipe.text_encoder_2)):
        prefix = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}[component]
        for key, value in get_peft_model_state_dict(model).items():
            module, _, rest = key.rpartition(".lora_")
            role = "down" if rest.startswith("A") else "up"
            te_module = module if component == "unet" or module.startswith("text_model.") else f"text_model.{module}"
            # kohya before SGM names (and OneTrainer): diffusers paths with "_", alpha keys.
            name = f"lora_{component}_" + te_module.replace(".", "_")
            kohya_old[f"{name}.lora_{role}.weight"] = value
            kohya_old[f"{name}.alpha"] = torch.tensor(2.0)
            lora_dot[f"{prefix}.{te_module}.lora.{role}.weight"] = value
            if component == "unet" and ".attn" in module:
                head, _, proj = module.rpartition(".")
                head, proj = (head.removesuffix(".to_out"), "to_out") if proj == "0" else (head, proj)
                processor[f"unet.{head}.processor.{proj}_lora.{role}.weight"] = value
    paths = {}
    for name, tensors in (("kohya_old", kohya_old), ("processor", processor), ("lora_dot", lora_dot)):
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(paths[name]))
    return paths


def test_reads_kohya_old_onetrainer_and_old_diffusers_namings(tmp_path):
    pipe = trained_pipe(LoraConfig(rank=4, alpha=2.0, targets="attn_ff"))
    te, layers = reference_modules(pipe)
    paths = other_tool_files(tmp_path, pipe)
    for name, path in paths.items():
        modules = read_lora(path, unet_config=dict(pipe.unet.config), text_configs=te).modules
        expected = layers if name != "processor" else {k: v for k, v in layers.items()
                                                          if k[0] == "unet" and ".attn" in k[1]}
        assert modules.keys() == expected.keys(), name
        for key, module in modules.items():
            layer = expected[key]
            assert torch.equal(module.down, layer.lora_A["default"].weight)
            assert torch.equal(module.up, layer.lora_B["default"].weight)
            # kohya files carry alpha; files without one mean alpha = rank (scale 1)
            assert module.alpha == (2.0 if name == "kohya_old" else 4.0)


def test_unknown_or_incomplete_keys_are_listed_never_dropped(tmp_path):
    down, up = torch.zeros(2, 8), torch.zeros(8, 2)
    good = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    cases = {
        "foreign": {f"{good}.lora_down.weight": down, f"{good}.lora_up.weight": up,
                    "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down.clone()},
        "half": {f"{good}.lora_down.weight": down},
        "peft": {"unet.not_a_block.to_q.lora_A.weight": down, "unet.not_a_block.to_q.lora_B.weight": up},
    }
    for name, tensors in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(ModelError) as err:
            read_lora(path)
        assert str(path) in str(err.value)
    assert "double_blocks" in str(pytest.raises(ModelError, read_lora, tmp_path / "foreign.safetensors").value)
    pickled = tmp_path / "x.pt"
    pickled.write_bytes(b"not read")
    with pytest.raises(ModelError, match="safetensors"):
        read_lora(pickled)
    sdxl = read_lora(_write(tmp_path / "ok.safetensors", {f"{good}.lora_down.weight": torch.ones(2, 640),
                                                         f"{good}.lora_up.weight": torch.ones(640, 2)}))
    assert list(sdxl.modules) == [("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")]


def _write(path, tensors):
    save_file(tensors, str(path))
    return path


# --- init_from for every variant -------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dora", "loha", "lokr"])
def test_init_from_reproduces_each_variant(tmp_path, variant):
    cfg = LoraConfig(rank=4, alpha=2.0, targets="locon", variant=variant)
    pipe = trained_pipe(cfg, text_encoders=False, seed=2)
    expected = outputs(pipe)[0]
    path = save_adapter(tmp_path / "a.safetensors", pipe.unet)
    fresh = build_tiny_pipeline(seed=0)
    add_unet_adapter(fresh.unet, cfg.model_copy(update={"alpha": 8.0}))  # another scale: folded in on load
    assert load_adapter_weights(fresh.unet, None, path) == len(list(adapter_layers(pipe.unet)))
    torch.testing.assert_close(outputs(fresh)[0], expected, rtol=1e-5, atol=1e-5)
    if variant == "dora":  # a file of one variant never initialises another
        other = build_tiny_pipeline(seed=0)
        add_unet_adapter(other.unet, cfg.model_copy(update={"variant": "lora"}))
        with pytest.raises(ConfigError, match="lora.variant = 'dora'"):
            load_adapter_weights(other.unet, None, path)


def test_loha_and_lokr_files_convert_to_kohya_unchanged_and_never_to_diffusers(tmp_path):
    for variant in ("loha", "lokr"):
        pipe = trained_pipe(LoraConfig(rank=4, alpha=2.0, targets="locon", variant=variant), text_encoders=False)
        src = save_adapter(tmp_path / f"{variant}.safetensors", pipe.unet)
        copy = convert_lora(src, tmp_path / f"{variant}-copy.safetensors", to="kohya",
                            unet_config=dict(pipe.unet.config))
        a, b = load_file(str(src)), load_file(str(copy))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        with pytest.raises(ModelError, match="kohya"):
            convert_lora(src, tmp_path / f"{variant}-d.safetensors", to="diffusers", unet_config=dict(pipe.unet.config))
        assert not (tmp_path / f"{variant}-d.safetensors").exists()
    with pytest.raises(ConfigError, match="kohya or diffusers"):
        convert_lora(src, tmp_path / "x.safetensors", to="a1111")
    with pytest.raises(ConfigError, match="--out"):
        convert_lora(src, src, to="kohya")
