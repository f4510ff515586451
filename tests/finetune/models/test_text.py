"""finetune/text.py: SDXL text conditioning equals diffusers' pipeline; long captions chunk or truncate."""

from __future__ import annotations

import pytest
import torch

from finetune.errors import ConfigError
from finetune.models.text import count_tokens, encode_prompts, num_chunks

LONG = " ".join(f"word{i % 7} thing" for i in range(60))  # well over 75 tokens


@pytest.fixture(scope="module")
def pipe():
    from finetune.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    # Real BPE ids, so that caption length, windows and padding are those of SDXL's tokenizers.
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert pipe.tokenizer_2.pad_token_id != pipe.tokenizer.pad_token_id  # "!" vs "<|endoftext|>", as SDXL
    return pipe


def _encode(pipe, captions, mode="truncate"):
    with torch.no_grad():
        return encode_prompts(captions, (pipe.tokenizer, pipe.tokenizer_2),
                              (pipe.text_encoder, pipe.text_encoder_2), long_captions=mode)


def _pipeline(pipe, captions):
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
    return embeds, pooled


def test_matches_pipeline_encode_prompt(pipe):
    captions = ["a photo of a cat", "a red square, on a white background", ""]
    embeds, pooled = _encode(pipe, captions)
    ref_embeds, ref_pooled = _pipeline(pipe, captions)
    assert embeds.shape == (3, 77, 32 + 64)
    assert pooled.shape == (3, 64)
    torch.testing.assert_close(embeds, ref_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-6, rtol=0)


def test_empty_caption_is_encoded_not_zeroed(pipe):
    embeds, pooled = _encode(pipe, [""])
    ref_embeds, ref_pooled = _pipeline(pipe, [""])
    torch.testing.assert_close(embeds, ref_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-6, rtol=0)
    assert embeds.abs().sum() > 0


def test_truncate_matches_pipeline_on_long_caption(pipe):
    assert count_tokens(pipe.tokenizer, LONG) > 75
    embeds, pooled = _encode(pipe, [LONG])
    ref_embeds, ref_pooled = _pipeline(pipe, [LONG])
    assert embeds.shape[1] == 77
    torch.testing.assert_close(embeds, ref_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-6, rtol=0)


def test_chunk_short_caption_equals_truncate(pipe):
    captions = ["a photo of a cat", ""]
    torch.testing.assert_close(_encode(pipe, captions, "chunk"), _encode(pipe, captions, "truncate"), atol=0, rtol=0)


def test_chunk_long_caption_windows(pipe):
    n = count_tokens(pipe.tokenizer, LONG)
    k = num_chunks(pipe.tokenizer, LONG)
    assert k == -(-n // 75) and k >= 2
    embeds, pooled = _encode(pipe, [LONG, "a cat"], "chunk")
    assert embeds.shape == (2, 77 * k, 96)
    # Independent check: each window, detokenized ids wrapped as the tokenizer would, encoded alone.
    ids = pipe.tokenizer(LONG, add_special_tokens=False).input_ids
    for i in range(k):
        window = pipe.tokenizer.decode(ids[i * 75:(i + 1) * 75])
        window_ids = [pipe.tokenizer(window, add_special_tokens=False).input_ids]
        assert window_ids[0] == ids[i * 75:(i + 1) * 75]
    first = _encode(pipe, [pipe.tokenizer.decode(ids[:75])])
    torch.testing.assert_close(embeds[:1, :77], first[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled[:1], first[1], atol=1e-6, rtol=0)
    last = _encode(pipe, [pipe.tokenizer.decode(ids[(k - 1) * 75:])])
    torch.testing.assert_close(embeds[:1, -77:], last[0], atol=1e-6, rtol=0)
    # The short caption is padded with empty chunks, which encode exactly as "".
    short, empty = _encode(pipe, ["a cat"]), _encode(pipe, [""])
    torch.testing.assert_close(embeds[1:, :77], short[0], atol=1e-6, rtol=0)
    for i in range(1, k):
        torch.testing.assert_close(embeds[1:, 77 * i:77 * (i + 1)], empty[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled[1:], short[1], atol=1e-6, rtol=0)


def test_count_tokens(pipe):
    assert count_tokens(pipe.tokenizer, "") == 0
    assert count_tokens(pipe.tokenizer, "a photo of a cat") == 5
    assert num_chunks(pipe.tokenizer, "") == 1


def test_unknown_mode_is_a_config_error(pipe):
    with pytest.raises(ConfigError, match="long_captions"):
        _encode(pipe, ["x"], "wrap")


def test_gradients_flow_when_enabled(pipe):
    embeds, pooled = encode_prompts(["a cat"], (pipe.tokenizer, pipe.tokenizer_2),
                                    (pipe.text_encoder, pipe.text_encoder_2))
    assert embeds.requires_grad and pooled.requires_grad
