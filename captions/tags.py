"""Per-step caption changes for comma-separated tag captions: shuffle, keep the first N, drop tags or all."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """The non-empty tags of `caption`, stripped."""
    return [tag.strip() for tag in caption.split(separator) if tag.strip()]


def process_caption(caption: str, rng: random.Random, *, shuffle_tags: bool = False, keep_tokens: int = 0,
                    tag_dropout: float = 0.0, caption_dropout: float = 0.0, separator: str = ",") -> str:
    """The caption for this step.

    With probability `caption_dropout` the empty caption (for classifier-free guidance). Otherwise, when
    tags are shuffled or dropped, the first `keep_tokens` tags stay in place and each of the others is
    dropped with probability `tag_dropout`; the rest are shuffled and all are joined with ", ".
    Without shuffling or tag dropout the caption is returned unchanged, so sentences keep their commas.
    Draws only from `rng`: the same rng state gives the same caption.

    Raises:
        ValueError: a probability outside [0, 1] or a negative keep_tokens.
    """
    for name, p in (("tag_dropout", tag_dropout), ("caption_dropout", caption_dropout)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} = {p}: must be between 0 and 1")
    if keep_tokens < 0:
        raise ValueError(f"keep_tokens = {keep_tokens}: must be >= 0")
    # Each draw happens only when its option is on, so turning one option on leaves the others' draws alone.
    if caption_dropout > 0 and rng.random() < caption_dropout:
        return ""
    if not (shuffle_tags or tag_dropout > 0):
        return caption
    tags = split_tags(caption, separator)
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    if tag_dropout > 0:
        rest = [tag for tag in rest if rng.random() >= tag_dropout]
    if shuffle_tags:
        rng.shuffle(rest)
    return f"{separator.strip() or ','} ".join(kept + rest)


def tag_frequencies(captions: Iterable[str], separator: str = ",") -> dict[str, int]:
    """How often each tag occurs over `captions`, most frequent first (kohya's ss_tag_frequency)."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(split_tags(caption, separator))
    return dict(counts.most_common())
