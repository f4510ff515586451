"""captions/length.py: one warning naming how many captions are too long, with a few examples."""

from __future__ import annotations

from captions import check_caption_lengths


def words(caption: str) -> int:
    return len(caption.split())


def test_none_when_all_fit():
    assert check_caption_lengths(["a b c", "d"], words, limit=3) is None
    assert check_caption_lengths([], words) is None


def test_counts_every_caption_and_counts_tokens_once_per_distinct():
    calls = []

    def counting(caption):
        calls.append(caption)
        return words(caption)

    long = "one two three four"
    message = check_caption_lengths([long, "short", long, "five six seven eight nine"], counting, limit=3)
    assert message.startswith("3 of 4 captions are longer than 3 CLIP tokens")
    assert "long_captions" in message
    assert sorted(calls) == sorted([long, "short", "five six seven eight nine"])


def test_examples_limited_longest_first_and_shortened():
    captions = [" ".join(["w"] * n) for n in (80, 90, 100, 120)]
    message = check_caption_lengths(captions, words, limit=75, examples=2)
    assert "(120 tokens)" in message and "(100 tokens)" in message
    assert "(90 tokens)" not in message and "(80 tokens)" not in message
    assert "..." in message
    assert "w " * 40 not in message  # examples are shortened, not pasted whole


def test_default_limit_is_75():
    assert check_caption_lengths([" ".join(["w"] * 75)], words) is None
    assert check_caption_lengths([" ".join(["w"] * 76)], words) is not None
