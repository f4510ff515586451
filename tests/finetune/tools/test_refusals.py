"""The tools never lose the user's data and never answer a damaged input with a traceback.

An existing output is replaced only with overwrite (the CLI's --overwrite), an input never; a damaged
.safetensors, config.json or LoRA module is one error naming the file, raised before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from finetune.adapters.convert import convert_lora
from finetune.cli import main
from finetune.errors import ConfigError, ModelError
from finetune.io import check_output, read_safetensors_header
from finetune.tools.caption import plan_captions
from finetune.tools.extract import extract_lora
from finetune.tools.merge import merge_loras
from finetune.tools.resize import resize_lora
from finetune.tools.sample import render_from_model

MODULE = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # (64, 64) in the tiny model


def kohya_lora(path, down=None, up=None, alpha=4.0, extra=None):
    """A one-module kohya LoRA that fits the tiny model (rank 4 unless `down` and `up` say otherwise)."""
    gen = torch.Generator().manual_seed(0)
    down = torch.randn(4, 64, generator=gen) if down is None else down
    up = torch.randn(64, 4, generator=gen) if up is None else up
    save_file({f"{MODULE}.lora_down.weight": down, f"{MODULE}.lora_up.weight": up,
               f"{MODULE}.alpha": torch.tensor(alpha), **(extra or {})}, str(path))
    return path


def raw_safetensors(path, header, data: bytes = b""):
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)
    return path


F32 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
DAMAGED = {  # how a file is damaged -> its bytes
    "truncated": lambda p: p.write_bytes(b"\x10\x00\x00"),
    "header longer than the file": lambda p: p.write_bytes((1 << 40).to_bytes(8, "little") + b"{}"),
    "header not JSON": lambda p: p.write_bytes((4).to_bytes(8, "little") + b"{{{{"),
    "header a list": lambda p: raw_safetensors(p, [1, 2]),
    "float shape": lambda p: raw_safetensors(p, {"a": {**F32, "shape": [1e12]}}, b"\0" * 4),
    "shape bigger than its bytes": lambda p: raw_safetensors(p, {"a": {**F32, "shape": [10**12]}}, b"\0" * 4),
    "offsets past the end": lambda p: raw_safetensors(p, {"a": {**F32, "data_offsets": [0, 8]}}, b"\0" * 4),
    "metadata not strings": lambda p: raw_safetensors(p, {"__metadata__": {"rank": 4}, "a": F32}, b"\0" * 4),
}


def damaged(path, how: str):
    DAMAGED[how](path)
    return path


# --- the shared checks (finetune.io) ---------------------------------------------------------------

@pytest.mark.parametrize("how", list(DAMAGED))
def test_a_damaged_safetensors_header_is_one_error_naming_the_file(tmp_path, how):
    path = damaged(tmp_path / "model.safetensors", how)
    with pytest.raises(ModelError, match=r"model\.safetensors: not a readable \.safetensors file .*export it again"):
        read_safetensors_header(path)


def test_a_good_header_reads_back(tmp_path):
    save_file({"w": torch.ones(2, 3)}, str(tmp_path / "ok.safetensors"), metadata={"k": "v"})
    entries, metadata, start = read_safetensors_header(tmp_path / "ok.safetensors")
    assert entries["w"]["shape"] == [2, 3] and metadata == {"k": "v"} and start > 8


def test_an_output_is_checked_against_existing_paths_and_the_inputs(tmp_path):
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "out.safetensors").write_bytes(b"user data")
    with pytest.raises(ConfigError, match=r"out\.safetensors: already exists; add --overwrite .*another --out"):
        check_output(tmp_path / "out.safetensors")
    check_output(tmp_path / "out.safetensors", overwrite=True)
    check_output(tmp_path / "new.safetensors")
    base = tmp_path / "models" / "base"
    for out, why in ((base, "is the input"), (tmp_path / "models", "is a folder holding the input"),
                     (base / "merged.safetensors", "lies inside the input")):
        with pytest.raises(ConfigError, match=why) as err:
            check_output(out, overwrite=True, inputs=[base], folder=True)
        assert str(out) in str(err.value) and str(base) in str(err.value)
    with pytest.raises(ConfigError, match="is a folder and this command writes a file"):
        check_output(base, overwrite=True)
    with pytest.raises(ConfigError, match="holds the current folder"):
        check_output(Path("."), overwrite=True, folder=True)


# --- refusing to write over the user's files ---------------------------------------------------------

def test_merge_refuses_an_existing_file_or_folder_and_replaces_a_folder_whole_when_asked(tiny_model_dir, tmp_path):
    lora = kohya_lora(tmp_path / "lora.safetensors")
    (tmp_path / "merged.safetensors").write_bytes(b"user data")
    with pytest.raises(ConfigError, match="merged.safetensors: already exists; add --overwrite"):
        merge_loras(tiny_model_dir, [(lora, 1.0)], tmp_path / "merged.safetensors")
    assert (tmp_path / "merged.safetensors").read_bytes() == b"user data"
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"a user's file")
    with pytest.raises(ConfigError, match="mine: already exists"):
        merge_loras(tiny_model_dir, [(lora, 1.0)], folder)
    assert [p.name for p in folder.iterdir()] == ["holiday.jpg"]
    merge_loras(tiny_model_dir, [(lora, 1.0)], folder, overwrite=True)
    assert (folder / "model_index.json").is_file() and not (folder / "holiday.jpg").exists()  # replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors", "merged.safetensors", "mine"]


def test_merge_and_extract_never_write_over_an_input_even_with_overwrite(tiny_model_dir, tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    lora = kohya_lora(loras / "lora.safetensors")
    for out in (tiny_model_dir, lora, loras, tiny_model_dir / "merged"):
        with pytest.raises(ConfigError, match="never written over") as err:
            merge_loras(tiny_model_dir, [(lora, 1.0)], out, overwrite=True)
        assert str(out) in str(err.value)
    assert not (tiny_model_dir / "merged").exists()
    with pytest.raises(ConfigError, match=f"is the input {tiny_model_dir}"):
        extract_lora(tmp_path / "loras", tiny_model_dir, 4, tiny_model_dir, overwrite=True)


def test_lora_tools_refuse_an_existing_out_until_told_to_overwrite(tmp_path):
    lora = kohya_lora(tmp_path / "lora.safetensors")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"user data")
    for tool in (lambda **kw: resize_lora(lora, out, 2, **kw), lambda **kw: convert_lora(lora, out, "diffusers", **kw)):
        with pytest.raises(ConfigError, match="out.safetensors: already exists; add --overwrite"):
            tool()
        assert out.read_bytes() == b"user data"
        tool(overwrite=True)
        assert read_safetensors_header(out)[0]
        out.write_bytes(b"user data")
    with pytest.raises(ConfigError, match="already exists"):
        extract_lora(lora, lora, 4, out)


def test_sample_refuses_an_existing_image_and_its_model_as_out_before_loading(tiny_model_dir, tmp_path):
    (tmp_path / "image.png").write_bytes(b"user data")
    with pytest.raises(ConfigError, match="image.png: already exists; add --overwrite"):
        render_from_model(tmp_path / "no-model", "a cat", tmp_path / "image.png", progress=False)
    with pytest.raises(ConfigError, match="is the input"):
        render_from_model(tiny_model_dir, "a cat", tiny_model_dir, progress=False, overwrite=True)


def test_cli_overwrite_flag_reaches_the_tools(tmp_path, capsys):
    lora = kohya_lora(tmp_path / "lora.safetensors")
    out = tmp_path / "small.safetensors"
    out.write_bytes(b"user data")
    assert main(["resize", str(lora), "--rank", "2", "--out", str(out)]) == 2
    assert f"--out {out}: already exists; add --overwrite" in capsys.readouterr().err
    assert main(["resize", str(lora), "--rank", "2", "--out", str(out), "--overwrite"]) == 0
    assert read_safetensors_header(out)[1]["resized"]
    (tmp_path / "tiny").mkdir()
    assert main(["tiny-model", str(tmp_path / "tiny")]) == 2  # refused before the model is built
    assert "tiny: already exists; add --overwrite" in capsys.readouterr().err


def test_merge_refuses_to_replace_the_word_embeddings_beside_a_single_file(tmp_path):
    save_file({"w": torch.ones(1)}, str(tmp_path / "base.safetensors"))
    lora = kohya_lora(tmp_path / "pivotal.safetensors", extra={"bundle_emb.<myDog>.clip_l": torch.ones(1, 32),
                                                               "bundle_emb.<myDog>.clip_g": torch.ones(1, 64)})
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "embeddings" / "myDog.safetensors").write_bytes(b"the user's own embedding")
    with pytest.raises(ConfigError, match="myDog.safetensors: already exists"):
        merge_loras(tmp_path / "base.safetensors", [(lora, 1.0)], tmp_path / "merged.safetensors")


def test_a_folder_where_a_caption_goes_is_a_failure_not_replaced(tmp_path):
    from conftest import make_image

    make_image(tmp_path / "a.png", 32, 32)
    (tmp_path / "a.txt").mkdir()
    todo, skipped, failures = plan_captions(tmp_path, ".txt", overwrite=True)
    assert todo == [] and skipped == 0 and "a.txt is a folder" in failures[0][1]


# --- damaged inputs: one line naming the file ----------------------------------------------------------

@pytest.mark.parametrize("how", ["header longer than the file", "header a list", "float shape"])
def test_merge_and_extract_name_a_damaged_checkpoint(tmp_path, how):
    base = damaged(tmp_path / "base.safetensors", how)
    lora = kohya_lora(tmp_path / "lora.safetensors")
    with pytest.raises(ModelError, match="base.safetensors: not a readable .safetensors file"):
        merge_loras(base, [(lora, 1.0)], tmp_path / "out.safetensors")
    with pytest.raises(ModelError, match="base.safetensors: not a readable .safetensors file"):
        extract_lora(base, base, 4, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_merge_names_a_broken_config_json_of_a_diffusers_base(tmp_path):
    lora = kohya_lora(tmp_path / "lora.safetensors")
    config = tmp_path / "base" / "unet" / "config.json"
    config.parent.mkdir(parents=True)
    for text, why in (('{"in_channels": 4,', "not valid JSON"), ("[1, 2]", "holds a JSON list")):
        config.write_text(text)
        with pytest.raises(ModelError, match=f"config.json: {why}"):
            merge_loras(tmp_path / "base", [(lora, 1.0)], tmp_path / "out")
    config.unlink()
    (tmp_path / "base" / "model_index.json").write_text("{")
    with pytest.raises(ModelError, match="model_index.json: not valid JSON"):
        merge_loras(tmp_path / "base", [(lora, 1.0)], tmp_path / "out.safetensors")


BROKEN_MODULES = {  # what is wrong -> (down, up) and the words the error uses
    "rank 0": ((torch.zeros(0, 64), torch.zeros(64, 0)), "rank 0"),
    "ranks differ": ((torch.ones(4, 64), torch.ones(64, 3)), r"up \(64, 3\) and down \(4, 64\), whose ranks differ"),
    "NaN": ((torch.ones(4, 64), torch.full((64, 4), float("nan"))), "NaN or infinite"),
    "inf": ((torch.full((4, 64), float("inf")), torch.ones(64, 4)), "NaN or infinite"),
}


@pytest.mark.parametrize("what", list(BROKEN_MODULES))
def test_resize_names_a_damaged_lora_module(tmp_path, what):
    (down, up), words = BROKEN_MODULES[what]
    lora = kohya_lora(tmp_path / "broken.safetensors", down, up)
    with pytest.raises(ModelError, match=rf"broken.safetensors: unet:down_blocks.1.attentions.0.*{words}"):
        resize_lora(lora, tmp_path / "small.safetensors", 2)
    assert not (tmp_path / "small.safetensors").exists()


@pytest.mark.parametrize("what", ["rank 0", "ranks differ"])
def test_merge_names_a_damaged_lora_module(tiny_model_dir, tmp_path, what):
    (down, up), words = BROKEN_MODULES[what]
    lora = kohya_lora(tmp_path / "broken.safetensors", down, up)
    with pytest.raises(ModelError, match=f"broken.safetensors: .*{words}"):
        merge_loras(tiny_model_dir, [(lora, 1.0)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sample_names_bad_settings_and_a_damaged_lora_before_loading_the_model(tiny_model_dir, tmp_path):
    out = tmp_path / "image.png"
    for settings, flag in (({"steps": 0}, "--steps 0: must be between 1 and 1000"),
                           ({"height": 0}, "--height 0: must be a positive multiple of 8"),
                           ({"width": 100}, "--width 100: must be a positive multiple of 8")):
        with pytest.raises(ConfigError, match=flag):  # a model that does not exist: checked before it is looked at
            render_from_model(tmp_path / "no-model", "a cat", out, progress=False, **settings)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 7 + b"not a LoRA at all")
    with pytest.raises(ModelError, match="garbage.safetensors: not a readable .safetensors file"):
        render_from_model(tiny_model_dir, "a cat", out, loras=[(garbage, 1.0)], progress=False)
    assert not out.exists()
