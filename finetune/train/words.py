"""The recipe's side of [[embeddings]]: add the words after caching, say what is cached, encode
captions that hold them live, and write the embedding files beside the run's weights."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from finetune.adapters.embedding_files import save_embedding, word_metadata, write_word_files
from finetune.adapters.embeddings import NewWords, add_new_words, mentions
from finetune.models.text import encode_prompts

log = logging.getLogger("finetune")


def setup_words(models, cfg, acc, captions) -> NewWords | None:
    """Add the [[embeddings]] words to the tokenizers and text encoders (after the text cache is
    built, so it stays keyed by the unchanged models); print what the text cache covers."""
    words = add_new_words(models.tokenizers, models.text_encoders, cfg.embeddings, cfg.training.seed)
    if words is None:
        return None
    acc.print(words.describe())
    captions = set(captions)
    for word in cfg.embeddings:
        if not any(word.token in caption for caption in captions):
            log.warning("embeddings: no caption contains %s, so it never trains; put it in the captions, "
                        "or in dataset.subsets.caption_prefix / instance_prompt", word.token)
    live = sum(mentions(c, cfg.embeddings) for c in captions)
    if cfg.cache.text:
        acc.print(f"text cache: {len(captions) - live} of {len(captions)} captions (and \"\") cached; {live} with "
                  "new words are encoded every step (frozen encoders, gradient into the new rows only)")
    else:
        acc.print(f"text: every caption encoded every step (cache.text = false); {live} hold new words")
    return words


def text_encoder_fn(models, long_captions: str, words: NewWords | None, weighted: bool = False) -> Callable:
    """captions -> (prompt_embeds, pooled) with the run's encoders; multi-vector words written out."""
    encoders = tuple(models.text_encoders)

    def encode(captions):
        captions = [words.expand(c) for c in captions] if words is not None else list(captions)
        return encode_prompts(captions, models.tokenizers, encoders, long_captions, weighted=weighted)

    return encode


class CachedUnlessMentioned:
    """The text-cache lookup, except for captions holding a new word: None, so they are encoded live.

    Picklable, for DataLoader workers.
    """

    def __init__(self, lookup: Callable, words):
        self.lookup, self.words = lookup, list(words)

    def __call__(self, caption: str):
        return None if mentions(caption, self.words) else self.lookup(caption)


def cached_text(lookup: Callable | None, words) -> Callable | None:
    return CachedUnlessMentioned(lookup, words) if lookup is not None and words else lookup


def freeze_after(words: NewWords | None, step: int, stop: int | None) -> None:
    """Pivotal tuning: the words train until step `stop` (training.embedding_stop_*), then freeze."""
    if words is not None:
        words.set_training(stop is None or step < stop)


def save_word_files(path: Path, words: NewWords, cfg, dtype: torch.dtype) -> list[Path]:
    """`<dir of path>/embeddings/<word>.safetensors` per word; method = "embedding": `path` itself holds
    the (first) word, as the run's one usable file."""
    extra = {"ss_base_model": cfg.model.name or Path(cfg.model.pretrained).stem}
    written = write_word_files(Path(path).parent / "embeddings", words, dtype, extra)
    if cfg.training.method == "embedding":
        written.append(save_embedding(path, words.vectors(0), word_metadata(words.words[0], extra), dtype))
    return written
