"""New words on the tiny model: token ids, which rows train, pooling, files that diffusers loads."""

from __future__ import annotations

import pytest
import torch

from finetune.adapters.embeddings import add_new_words, expand_prompt, token_names
from finetune.config import EmbeddingConfig
from finetune.models.text import encode_prompts


def word(**kwargs) -> EmbeddingConfig:
    return EmbeddingConfig(**{"token": "<myDog>", "vectors": 2, "init_word": "dog", **kwargs})


@pytest.fixture
def pipe():
    from finetune.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


def encode(pipe, words, captions):
    captions = [words.expand(c) for c in captions] if words is not None else captions
    return encode_prompts(captions, (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2))


def test_a_multi_vector_word_is_written_out_as_diffusers_names_it():
    words = [word(vectors=3), word(token="<cat>", vectors=1)]
    assert token_names("<myDog>", 3) == ["<myDog>", "<myDog>_1", "<myDog>_2"]
    assert expand_prompt("a <myDog>, and <cat>", words) == "a <myDog> <myDog>_1 <myDog>_2, and <cat>"
    assert expand_prompt("a <myDog> <myDog>_1 <myDog>_2", words) == "a <myDog> <myDog>_1 <myDog>_2"  # already out


def test_new_ids_start_from_the_init_word_and_only_they_train(pipe):
    before = {f"{i}.{n}": p.detach().clone() for i, te in enumerate((pipe.text_encoder, pipe.text_encoder_2))
              for n, p in te.named_parameters()}
    dog = pipe.tokenizer("dog", add_special_tokens=False).input_ids
    words = add_new_words((pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2), [word()], 0)
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        assert tokenizer("a <myDog> <myDog>_1").input_ids == [49406, 320, 49408, 49409, 49407]
    vectors = {k: v.clone() for k, v in words.vectors(0).items()}
    assert vectors["clip_l"].shape == (2, 32) and vectors["clip_g"].shape == (2, 64)
    assert torch.equal(vectors["clip_l"][0], before["0.embeddings.token_embedding.weight"][dog[0]])

    optimizer = torch.optim.AdamW(words.trained_parameters(), lr=0.1, weight_decay=0.1)
    embeds, pooled = encode(pipe, words, ["a photo of <myDog>", "a photo"])
    (embeds.square().mean() + pooled.square().mean()).backward()
    optimizer.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in words.trained_parameters())
    assert not torch.equal(words.vectors(0)["clip_g"], vectors["clip_g"])
    for i, te in enumerate((pipe.text_encoder, pipe.text_encoder_2)):
        for name, param in te.named_parameters():
            name = name.replace("token_embedding.base.", "token_embedding.")
            assert torch.equal(param, before[f"{i}.{name}"]), name  # every other row and weight: bitwise


def test_captions_without_the_word_encode_exactly_as_before_and_pooling_ignores_new_ids(pipe):
    plain = ["a photo of a dog", ""]
    embeds, pooled = encode(pipe, None, plain)
    # SDXL's real configs say eos_token_id = 2, which pools at the largest id: a new token's.
    for te in (pipe.text_encoder, pipe.text_encoder_2):
        for module in te.modules():
            if hasattr(module, "eos_token_id"):
                module.eos_token_id = 2
    words = add_new_words((pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2),
                          [word(init_word=None)], 0)
    after, pooled_after = encode(pipe, words, plain)
    assert torch.equal(after, embeds) and torch.equal(pooled_after, pooled)
    ids = pipe.tokenizer_2(["a <myDog> <myDog>_1"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    out = pipe.text_encoder_2.text_model(ids)
    assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, 4])  # at <|endoftext|>, not at 49409


def test_only_the_named_encoders_rows_train_and_frozen_words_get_no_update(pipe):
    words = add_new_words((pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2),
                          [word(encoders=["clip_g"])], 0)
    assert [p.shape[1] for p in words.trained_parameters()] == [64]
    words.set_training(False)  # pivotal tuning after training.embedding_stop_*
    embeds, _ = encode(pipe, words, ["<myDog>"])
    assert not embeds.requires_grad


@pytest.mark.slow  # builds or loads two pipelines
def test_the_embedding_file_loads_in_diffusers_with_the_training_effect(tmp_path, pipe):
    from safetensors.torch import load_file

    from finetune.adapters.embedding_files import read_embedding, write_word_files
    from finetune.models.tiny import build_tiny_pipeline

    words = add_new_words((pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2),
                          [word(init_word=None)], 7)
    [path] = write_word_files(tmp_path, words)
    assert path.name == "myDog.safetensors"
    tensors, header = read_embedding(path)
    assert tensors["clip_l"].shape == (2, 32) and tensors["clip_g"].shape == (2, 64)
    assert header["token"] == "<myDog>" and header["vectors"] == "2"

    fresh = build_tiny_pipeline(seed=0)
    state = load_file(str(path))
    fresh.load_textual_inversion(state["clip_l"], token="<myDog>", text_encoder=fresh.text_encoder,
                                 tokenizer=fresh.tokenizer)
    fresh.load_textual_inversion(state["clip_g"], token="<myDog>", text_encoder=fresh.text_encoder_2,
                                 tokenizer=fresh.tokenizer_2)
    prompt = "a photo of <myDog>"
    with torch.no_grad():
        ours, ours_pooled = encode(pipe, words, [prompt])
        # diffusers' own expansion misses capitalised tokens (its tokenizer lower-cases): write it out.
        theirs, _, theirs_pooled, _ = fresh.encode_prompt(words.expand(prompt), do_classifier_free_guidance=False)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs_pooled, ours_pooled, atol=1e-5, rtol=0)


def test_config_refuses_words_that_cannot_work(tmp_path):
    from finetune.config import validate_config
    from finetune.errors import ConfigError

    (tmp_path / "m").mkdir()
    (tmp_path / "i").mkdir()
    base = {"model": {"pretrained": "m"}, "dataset": {"subsets": [{"folder": "i"}]}}
    with pytest.raises(ConfigError, match="embeddings.0.token"):
        validate_config({**base, "embeddings": [{"token": "<my.dog>"}]}, tmp_path)
    with pytest.raises(ConfigError, match="add one"):
        validate_config({**base, "training": {"method": "embedding"}}, tmp_path)
    with pytest.raises(ConfigError, match="embedding_stop"):
        validate_config({**base, "training": {"method": "embedding", "embedding_stop_step": 3},
                         "embeddings": [{"token": "<d>"}]}, tmp_path)
    cfg = validate_config({**base, "training": {"max_steps": 100, "embedding_stop_fraction": 0.25},
                           "embeddings": [{"token": "<d>"}]}, tmp_path)
    assert cfg.training.embedding_stop == 25 and cfg.embeddings[0].encoders == ["clip_l", "clip_g"]


def test_a_batch_mixing_cached_and_live_captions_is_encoded_live():
    from finetune.train.batches import collate

    cached = {"caption": "a photo", "prompt_embeds": torch.zeros(77, 8), "x": torch.ones(1)}
    live = {"caption": "a <myDog>", "x": torch.ones(1)}
    batch = collate([cached, live])
    assert batch["caption"] == ["a photo", "a <myDog>"] and "prompt_embeds" not in batch
    assert "prompt_embeds" in collate([cached, cached])


def test_a_word_in_a_long_captions_second_chunk_still_trains(pipe):
    words = add_new_words((pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2), [word()], 0)
    caption = words.expand(", ".join(["red"] * 80) + ", <myDog>")  # past the first 75 tokens
    embeds, _ = encode_prompts([caption, ""], (pipe.tokenizer, pipe.tokenizer_2),
                               (pipe.text_encoder, pipe.text_encoder_2), "chunk")
    assert embeds.shape[1] == 3 * 77
    embeds[:, 77:].square().mean().backward()  # the second and third chunks only
    assert all(p.grad.abs().sum() > 0 for p in words.trained_parameters())
