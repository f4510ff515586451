"""Weighted captions: A1111's emphasis on SDXL's two encoders, checked by hand on the tiny model."""

from __future__ import annotations

import pytest
import torch

from finetune.models.text import encode_prompts


@pytest.fixture(scope="module")
def pipe():
    from finetune.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


def _encode(pipe, captions, weighted, mode="truncate"):
    with torch.no_grad():
        return encode_prompts(captions, (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2),
                              long_captions=mode, weighted=weighted)


def test_weighted_caption_equals_a1111_by_hand(pipe):
    plain, plain_pooled = _encode(pipe, ["a red cat"], weighted=False)
    embeds, pooled = _encode(pipe, ["a (red:1.5) [cat]"], weighted=True)
    # Same tokens either way: BOS, a, red, cat, EOS, padding.
    assert pipe.tokenizer("a red cat").input_ids == [49406, 320, 736, 2368, 49407]
    multipliers = torch.ones(77)
    multipliers[2], multipliers[3] = 1.5, 1 / 1.1
    # A1111 "Original" emphasis, per encoder: z·m, then scaled back to z's mean (one prompt per batch).
    expected = []
    for z in plain[0].split([32, 64], dim=-1):  # CLIP-L (32 wide here) and bigG (64) parts
        weighted = z * multipliers[:, None]
        expected.append(weighted * (z.mean() / weighted.mean()))
    torch.testing.assert_close(embeds[0], torch.cat(expected, dim=-1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pooled, plain_pooled, atol=0, rtol=0)  # pooled stays unweighted (A1111, kohya)
    for part, before in zip(embeds[0].split([32, 64], dim=-1), plain[0].split([32, 64], dim=-1)):
        assert float(part.mean()) == pytest.approx(float(before.mean()), rel=1e-4, abs=1e-7)  # mean restored


def test_no_syntax_is_bit_identical_and_a_caption_ignores_its_batch(pipe):
    captions = ["a photo of a cat", "a red square, on a white background"]
    for mode in ("truncate", "chunk"):
        assert torch.equal(_encode(pipe, captions, True, mode)[0], _encode(pipe, captions, False, mode)[0])
    alone = _encode(pipe, ["a (red:1.3) square"], True)[0]
    together = _encode(pipe, ["a (red:1.3) square", "((a dog))"], True)[0]
    torch.testing.assert_close(together[:1], alone, atol=1e-6, rtol=0)  # per-caption mean: cache-safe


def test_chunked_weights_follow_the_token_across_windows(pipe):
    from finetune.models.weighted import weighted_ids

    caption = " ".join(["thing"] * 80) + " (cat:2)"
    ids, multipliers = weighted_ids(pipe.tokenizer, [caption], chunks=2)
    assert ids.shape == multipliers.shape == (2, 77)
    assert multipliers[0].eq(1).all() and multipliers[1, 6].item() == 2.0 and ids[1, 6].item() == 2368
    truncated, _ = weighted_ids(pipe.tokenizer, [caption], chunks=None)
    assert truncated.shape == (1, 77) and truncated[0, -1].item() == 49407


def test_text_cache_keys_weighted_captions_apart(pipe, tmp_path):
    from finetune.cache.text import TextCache, build_text_cache

    tokenizers, encoders = (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2)
    caption = "a (red:1.5) cat"
    for weighted in (False, True):
        build_text_cache([caption], tokenizers, encoders, tmp_path / "text", dtype="fp32", weighted=weighted,
                         progress=False)
    cache = TextCache(tmp_path / "text")  # reads the last build's mode: weighted
    cached, _ = cache.get(caption)
    torch.testing.assert_close(cached, _encode(pipe, [caption], True)[0][0], atol=1e-6, rtol=0)
