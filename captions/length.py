"""Caption length against CLIP's 75-token window: one warning with a count and examples."""

from __future__ import annotations

from collections.abc import Callable, Iterable


def check_caption_lengths(captions: Iterable[str], count_tokens: Callable[[str], int], limit: int = 75,
                          examples: int = 3) -> str | None:
    """A warning text when captions exceed `limit` tokens, else None."""
    long = [(caption, n) for caption in dict.fromkeys(captions) if (n := count_tokens(caption)) > limit]
    if not long:
        return None
    shown = "; ".join(f"{c[:60]!r}{'...' if len(c) > 60 else ''} ({n} tokens)" for c, n in long[:examples])
    return (f"{len(long)} caption(s) are longer than {limit} CLIP tokens and will be truncated "
            f"(or set dataset.long_captions = 'chunk'): {shown}")
