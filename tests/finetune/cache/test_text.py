"""finetune/cache/text.py: cached embeddings equal encode_prompts; "" always cached; keyed by encoders."""

from __future__ import annotations

import pytest
import torch

from finetune.cache import TextCache, build_text_cache
from finetune.models.text import encode_prompts

CAPTIONS = ["a photo of a cat", "a red square", "a photo of a cat"]
LONG = " ".join(f"word{i % 7} thing" for i in range(60))


def _encode(text_models, captions, mode="truncate"):
    with torch.no_grad():
        return encode_prompts(captions, *text_models, long_captions=mode)


def test_cached_embeddings_equal_encode_prompts(tmp_path, text_models):
    stats = build_text_cache(CAPTIONS, *text_models, tmp_path, dtype="fp32", batch_size=2, progress=False)
    assert (stats.encoded, stats.reused) == (3, 0)  # two unique captions and ""
    assert str(stats) == "text: 3 encoded, 0 reused"
    cache = TextCache(tmp_path)
    for caption in ["a photo of a cat", "a red square", ""]:
        embeds, pooled = cache.get(caption)
        ref_embeds, ref_pooled = _encode(text_models, [caption])
        assert embeds.shape == (77, 96) and pooled.shape == (64,)
        torch.testing.assert_close(embeds, ref_embeds[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(pooled, ref_pooled[0], atol=1e-6, rtol=0)


def test_fp16_storage(tmp_path, text_models):
    build_text_cache(["a cat"], *text_models, tmp_path, dtype="fp16", progress=False)
    embeds, pooled = TextCache(tmp_path).get("a cat")
    ref_embeds, ref_pooled = _encode(text_models, ["a cat"])
    assert embeds.dtype == torch.float16
    torch.testing.assert_close(embeds.float(), ref_embeds[0], atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(pooled.float(), ref_pooled[0], atol=1e-2, rtol=1e-3)


def test_empty_caption_always_cached(tmp_path, text_models):
    build_text_cache([], *text_models, tmp_path, progress=False)
    cache = TextCache(tmp_path)
    assert "" in cache and "a cat" not in cache
    with pytest.raises(Exception, match="finetune cache"):
        cache.get("a cat")


def test_reuse_and_new_captions(tmp_path, text_models):
    build_text_cache(CAPTIONS, *text_models, tmp_path, progress=False)
    stats = build_text_cache([*CAPTIONS, "a dog"], *text_models, tmp_path, progress=False)
    assert str(stats) == "text: 1 encoded, 3 reused"


def test_changing_an_encoder_reencodes_all(tmp_path, text_models):
    from finetune.models.tiny import build_tiny_pipeline

    build_text_cache(CAPTIONS, *text_models, tmp_path, progress=False)
    other = build_tiny_pipeline(seed=1)
    tokenizers, (te1, _) = text_models
    stats = build_text_cache(CAPTIONS, tokenizers, (te1, other.text_encoder_2), tmp_path, progress=False)
    assert (stats.encoded, stats.reused) == (3, 0)
    # The reader follows the last build: it answers with the new encoder's embeddings.
    torch.testing.assert_close(TextCache(tmp_path).get("a red square")[1].float(),
                               _encode((tokenizers, (te1, other.text_encoder_2)), ["a red square"])[1][0],
                               atol=1e-2, rtol=1e-3)
    # So does the mode.
    assert build_text_cache(CAPTIONS, *text_models, tmp_path, long_captions="chunk", progress=False).encoded == 3


def test_chunked_captions_pad_to_longest(tmp_path, text_models):
    build_text_cache(["a cat", LONG], *text_models, tmp_path, dtype="fp32", long_captions="chunk", progress=False)
    cache = TextCache(tmp_path)
    ref_embeds, ref_pooled = _encode(text_models, [LONG, "a cat"], "chunk")
    k = ref_embeds.shape[1] // 77
    assert k >= 2 and cache.max_chunks == k
    for i, caption in enumerate([LONG, "a cat"]):
        embeds, pooled = cache.get(caption)
        assert embeds.shape == (77 * k, 96)
        torch.testing.assert_close(embeds, ref_embeds[i], atol=1e-6, rtol=0)
        torch.testing.assert_close(pooled, ref_pooled[i], atol=1e-6, rtol=0)
