"""captions/tags.py: shuffle, keep_tokens, tag and caption dropout; determinism and rates."""

from __future__ import annotations

import random

import pytest

from captions import process_caption, tag_frequencies

TAGS = "sks, 1girl, red hair, smile, outdoors, blue sky, tree, looking at viewer"
TAG_LIST = [t.strip() for t in TAGS.split(",")]


def test_no_options_returns_caption_unchanged():
    rng = random.Random(0)
    sentence = "a dog, running on a beach,at sunset"
    assert process_caption(sentence, rng) == sentence
    assert process_caption(sentence, rng, keep_tokens=2) == sentence
    assert rng.random() == random.Random(0).random()  # nothing was drawn


def test_shuffle_is_permutation_and_deterministic():
    outs = [process_caption(TAGS, random.Random(7), shuffle_tags=True) for _ in range(3)]
    assert outs[0] == outs[1] == outs[2]
    assert sorted(outs[0].split(", ")) == sorted(TAG_LIST)
    variants = {process_caption(TAGS, random.Random(seed), shuffle_tags=True) for seed in range(50)}
    assert len(variants) > 40


def test_same_rng_stream_reproduces_sequence():
    a, b = random.Random(3), random.Random(3)
    kwargs = dict(shuffle_tags=True, keep_tokens=1, tag_dropout=0.3, caption_dropout=0.1)
    assert [process_caption(TAGS, a, **kwargs) for _ in range(100)] == \
           [process_caption(TAGS, b, **kwargs) for _ in range(100)]


def test_keep_tokens_stay_in_place():
    for seed in range(200):
        out = process_caption(TAGS, random.Random(seed), shuffle_tags=True, keep_tokens=2, tag_dropout=0.5)
        assert out.split(", ")[:2] == ["sks", "1girl"]


def test_keep_tokens_larger_than_tag_count():
    assert process_caption("a, b", random.Random(0), shuffle_tags=True, keep_tokens=5) == "a, b"


def test_output_normalised_to_comma_space():
    out = process_caption(" a ,b,, c ", random.Random(0), shuffle_tags=True, keep_tokens=3)
    assert out == "a, b, c"


def test_tag_dropout_rate_and_keep_tokens_never_dropped():
    rng = random.Random(11)
    draws, dropped = 2000, 0
    for _ in range(draws):
        out = process_caption(TAGS, rng, keep_tokens=1, tag_dropout=0.25).split(", ")
        assert out[0] == "sks"
        dropped += len(TAG_LIST) - len(out)
    rate = dropped / (draws * (len(TAG_LIST) - 1))
    assert abs(rate - 0.25) < 0.02


def test_tag_dropout_alone_keeps_order():
    for seed in range(50):
        out = process_caption(TAGS, random.Random(seed), tag_dropout=0.5)
        tags = out.split(", ") if out else []  # every tag may be dropped: the empty caption
        assert tags == [t for t in TAG_LIST if t in tags]


def test_caption_dropout_rate():
    rng = random.Random(5)
    empties = sum(process_caption(TAGS, rng, caption_dropout=0.1) == "" for _ in range(2000))
    assert abs(empties / 2000 - 0.1) < 0.02


def test_caption_dropout_extremes():
    assert process_caption(TAGS, random.Random(0), caption_dropout=1.0) == ""
    assert process_caption(TAGS, random.Random(0), caption_dropout=0.0) == TAGS


def test_other_separator():
    out = process_caption("a; b; c", random.Random(0), keep_tokens=3, shuffle_tags=True, separator=";")
    assert out == "a; b; c"


@pytest.mark.parametrize("kwargs, name", [
    (dict(tag_dropout=1.5), "tag_dropout"),
    (dict(caption_dropout=-0.1), "caption_dropout"),
    (dict(keep_tokens=-1), "keep_tokens"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        process_caption(TAGS, random.Random(0), **kwargs)


def test_tag_frequencies():
    freqs = tag_frequencies(["a, b", "b, c ,", "b", ""])
    assert freqs == {"b": 3, "a": 1, "c": 1}
    assert next(iter(freqs)) == "b"  # most frequent first
    assert tag_frequencies(["x; y"], separator=";") == {"x": 1, "y": 1}
