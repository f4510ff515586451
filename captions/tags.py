"""Per-step caption changes for comma-separated tag captions: shuffle, keep the first N, drop tags or all."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable


def split_tags(caption: str, separator: str = ",") -> list[str]:
    return [tag.strip() for tag in caption.split(separator) if tag.strip()]


def process_caption(caption: str, rng: random.Random, *, shuffle_tags: bool = False, keep_tokens: int = 0,
                    tag_dropout: float = 0.0, caption_dropout: float = 0.0, separator: str = ",") -> str:
    """The caption for this step. Deterministic for a given rng state; "" with probability caption_dropout."""
    if caption_dropout > 0 and rng.random() < caption_dropout:
        return ""
    if not (shuffle_tags or tag_dropout > 0):
        return caption
    tags = split_tags(caption, separator)
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    if tag_dropout > 0:
        rest = [tag for tag in rest if rng.random() >= tag_dropout]
    if shuffle_tags:
        rng.shuffle(rest)
    return ", ".join(fixed + rest)


def tag_frequencies(captions: Iterable[str], separator: str = ",") -> dict[str, int]:
    """How often each tag occurs (for adapter metadata, kohya's ss_tag_frequency)."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(split_tags(caption, separator))
    return dict(counts.most_common())
