"""Textual inversion and pivotal tuning end to end on the tiny model: what trains, the files, resume, merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer_runs import assert_resolved_is_the_runs, make_shapes_folder, write_config
from finetune.config import load_config
from finetune.train.recipe import Recipe, StopFlag, train

pytestmark = pytest.mark.slow

WORD = '\n[[embeddings]]\ntoken = "<myDog>"\nvectors = 2\ninit_word = "dog"\n'
SETTINGS = ["training.embedding_lr=0.05", "output.save_dtype=fp32"]


@pytest.fixture(scope="module")
def dog_folder(tmp_path_factory) -> Path:
    folder = make_shapes_folder(tmp_path_factory.mktemp("dogs"))
    for i in range(2):  # two of the four captions hold the word; the other two stay cached
        (folder / f"{i}.txt").write_text(f"a photo of <myDog> number {i}", encoding="utf-8")
    return folder


def comfy_reference():
    import importlib.util

    path = Path(__file__).parents[1] / "adapters" / "comfy_keys.py"
    spec = importlib.util.spec_from_file_location("comfy_keys", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fresh_pipeline(model_dir: Path, embedding: dict | None = None):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for key, te, tok in (("clip_l", pipe.text_encoder, pipe.tokenizer), ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):
        if embedding is not None:
            pipe.load_textual_inversion(embedding[key], token="<myDog>", text_encoder=te, tokenizer=tok)
    return pipe


def sample(pipe, prompt: str):
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt.replace("<myDog>", "<myDog> <myDog>_1"), num_inference_steps=2, guidance_scale=1.0,
                height=64, width=64, generator=generator, output_type="np").images


def test_embedding_run_trains_the_new_rows_only_and_changes_samples_with_the_word(tmp_path, tiny_model_dir, dog_folder):
    cfg = load_config(write_config(tmp_path, tiny_model_dir, dog_folder, steps=4, every=10, extra=WORD),
                      ["training.method=embedding", *SETTINGS])
    run = Recipe(cfg, progress=False).setup()
    with StopFlag() as stop:
        run.train_loop(stop)
    run.finish(False)

    out = cfg.output.dir
    assert_resolved_is_the_runs(out)
    trained = load_file(str(out / "embeddings" / "myDog.safetensors"))
    assert {k: tuple(v.shape) for k, v in trained.items()} == {"clip_l": (2, 32), "clip_g": (2, 64)}
    assert all(torch.equal(trained[k], v) for k, v in load_file(str(out / "lora.safetensors")).items())
    # Every weight the run holds but the new rows is bitwise the base model's.
    base = fresh_pipeline(tiny_model_dir)
    for ours, theirs in ((run.models.text_encoder, base.text_encoder), (run.models.text_encoder_2, base.text_encoder_2),
                         (run.models.unet, base.unet)):
        reference = dict(theirs.named_parameters())
        for name, param in ours.named_parameters():
            assert torch.equal(param, reference[name.replace("token_embedding.base.", "token_embedding.")]), name
    dog = base.tokenizer("dog", add_special_tokens=False).input_ids[0]
    init = {"clip_l": base.text_encoder.get_input_embeddings().weight[[dog, dog]].detach(),
            "clip_g": base.text_encoder_2.get_input_embeddings().weight[[dog, dog]].detach()}
    assert not torch.equal(trained["clip_l"], init["clip_l"]) and not torch.equal(trained["clip_g"], init["clip_g"])

    with_trained, with_init = fresh_pipeline(tiny_model_dir, trained), fresh_pipeline(tiny_model_dir, init)
    assert (sample(with_trained, "a photo of <myDog>") != sample(with_init, "a photo of <myDog>")).any()
    assert (sample(with_trained, "a photo of a cat") == sample(base, "a photo of a cat")).all()


def test_pivotal_run_resumes_bitwise_bundles_the_word_and_merges_it(tmp_path, tiny_model_dir, dog_folder):
    from finetune.adapters.embedding_files import split_bundled
    from finetune.tools.merge import merge_loras

    stop = ["training.embedding_stop_step=3", *SETTINGS]
    whole = tmp_path / "whole"
    whole.mkdir()
    full = train(load_config(write_config(whole, tiny_model_dir, dog_folder, steps=4, every=2, extra=WORD), stop),
                 progress=False)
    parts = tmp_path / "parts"
    parts.mkdir()
    path = write_config(parts, tiny_model_dir, dog_folder, steps=4, every=2, extra=WORD)
    assert train(load_config(path, [*stop, "training.max_steps=2"]), progress=False).step == 2
    resumed = train(load_config(path, stop), resume="latest", progress=False)

    word = "embeddings/myDog.safetensors"
    assert (whole / "out" / word).read_bytes() == (parts / "out" / word).read_bytes()
    assert full.losses[2:] == resumed.losses
    at_2 = load_file(str(whole / "out" / "checkpoints" / "step-000002" / word))
    final = load_file(str(whole / "out" / word))
    assert not torch.equal(at_2["clip_g"], final["clip_g"])  # step 3 trained it; step 4 did not (stop_step)

    lora, bundled = split_bundled(load_file(str(full.output_path)))
    assert set(bundled) == {"<myDog>"} and all(torch.equal(bundled["<myDog>"][k], final[k]) for k in final)
    base = fresh_pipeline(tiny_model_dir)
    comfy = comfy_reference()
    names = {k.partition(".")[0] for k in lora}
    assert names <= set(comfy.comfy_unet_lora_names(base.unet)), sorted(names)[:5]  # bundle aside, ComfyUI's names
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = {"encoder_hidden_states": torch.randn(1, 77, 96), "added_cond_kwargs": {
        "text_embeds": torch.randn(1, 64), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}
    with torch.no_grad():
        before = base.unet(latents, torch.tensor([500]), **cond).sample
        base.load_lora_weights(lora)  # the LoRA's own keys, without the bundle, load in diffusers
        assert (base.unet(latents, torch.tensor([500]), **cond).sample - before).abs().max() > 1e-5

    merged = merge_loras(tiny_model_dir, [(full.output_path, 1.0)], tmp_path / "merged")
    assert "<myDog>" in str(merged)
    pipe = fresh_pipeline(tmp_path / "merged")
    for tokenizer, encoder, key in ((pipe.tokenizer, pipe.text_encoder, "clip_l"),
                                    (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")):
        assert tokenizer("<myDog> <myDog>_1").input_ids == [49406, 49408, 49409, 49407]
        assert torch.equal(encoder.get_input_embeddings().weight[49408:], final[key])
