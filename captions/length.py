"""Caption length against CLIP's 75-token window: one warning with a count and examples."""

from __future__ import annotations

from collections.abc import Callable, Iterable

EXAMPLE_CHARS = 60  # an example is shortened to this many characters, enough to recognise it


def check_caption_lengths(captions: Iterable[str], count_tokens: Callable[[str], int], limit: int = 75,
                          examples: int = 3) -> str | None:
    """One warning text when captions exceed `limit` tokens, else None.

    `count_tokens` counts a caption's tokens without the start/end tokens (the lead passes a CLIP
    tokenizer; tests a fake). Each distinct caption is counted once; the total counts every caption.
    """
    lengths: dict[str, int] = {}
    total = over = 0
    for caption in captions:
        total += 1
        if caption not in lengths:
            lengths[caption] = count_tokens(caption)
        over += lengths[caption] > limit
    if not over:
        return None
    long = sorted(((n, c) for c, n in lengths.items() if n > limit), key=lambda item: -item[0])
    shown = "; ".join(f"{_shorten(c)!r} ({n} tokens)" for n, c in long[:examples])
    return (f"{over} of {total} captions are longer than {limit} CLIP tokens; the rest is cut off unless "
            f"dataset.long_captions = 'chunk'. Longest: {shown}")


def _shorten(caption: str) -> str:
    return caption if len(caption) <= EXAMPLE_CHARS else caption[:EXAMPLE_CHARS - 3].rstrip() + "..."
