"""The text-embedding cache: each unique caption (and always "") encoded once by both text encoders."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from finetune.cache.build import run_build, store_dtype
from finetune.cache.keys import text_identity, text_key
from finetune.cache.store import CacheError, CacheStats, ShardReader
from finetune.models.text import CONTEXT_LENGTH, encode_prompts, num_chunks


def build_text_cache(captions: Iterable[str], tokenizers, text_encoders, cache_dir: Path, *, dtype: str = "fp16",
                     long_captions: str = "truncate", batch_size: int = 8, accelerator=None,
                     progress: bool = True, shard_size: int = 256, weighted: bool = False) -> CacheStats:
    """Encode every caption the cache lacks; "" is always included so caption dropout works with the cache.

    Stores per caption `prompt_embeds` (77*k, C) and `pooled_prompt_embeds` (P,), k its own chunk
    count (1 when truncating); `TextCache` pads to the longest caption of this build on read.
    """
    out_dtype = store_dtype(dtype)
    captions = list(dict.fromkeys(["", *captions]))
    text_id = text_identity(tokenizers, text_encoders)
    # Weighted captions encode the same text differently: the mode joins the key (and TextCache reads it back).
    mode = f"{long_captions}+weighted" if weighted else long_captions
    key_of = {caption: text_key(caption, text_id, mode, dtype) for caption in captions}
    caption_of = {key: caption for caption, key in key_of.items()}
    chunks_of = {c: _chunks(tokenizers, c, long_captions, weighted) for c in captions}

    def encode(missing: list[str]) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        # Captions of one chunk count per call: encode_prompts pads a batch to its longest caption,
        # and a cached entry must not depend on which captions shared its batch.
        groups: dict[int, list[str]] = defaultdict(list)
        for key in missing:
            groups[chunks_of[caption_of[key]]].append(caption_of[key])
        for _, group in sorted(groups.items()):
            for i in range(0, len(group), batch_size):
                batch = group[i:i + batch_size]
                with torch.no_grad():
                    embeds, pooled = encode_prompts(batch, tuple(tokenizers), tuple(text_encoders), long_captions,
                                                    weighted=weighted)
                for j, caption in enumerate(batch):
                    yield key_of[caption], {"prompt_embeds": embeds[j].to(out_dtype),
                                            "pooled_prompt_embeds": pooled[j].to(out_dtype)}

    current = {"text_identity": text_id, "long_captions": mode, "dtype": dtype,
               "max_chunks": max(chunks_of.values())}
    return run_build("text", cache_dir, list(key_of.values()), encode, accelerator=accelerator,
                     shard_size=shard_size, progress=progress, unit="caption", index_extra={"current": current})


def _chunks(tokenizers, caption: str, long_captions: str, weighted: bool = False) -> int:
    if long_captions != "chunk":
        return 1
    return max(num_chunks(tokenizer, caption, weighted) for tokenizer in tokenizers)


class TextCache:
    """Read side for training: `get(caption)` -> (prompt_embeds (77*k, C), pooled_prompt_embeds (P,)).

    Looks captions up under the encoders and settings of the last build in `cache_dir`. In "chunk"
    mode every result is padded with the empty caption's embedding (an empty chunk, as
    `encode_prompts` pads a batch) to the longest caption's chunk count, so samples stack.
    """

    def __init__(self, cache_dir: Path, in_memory: bool = False, verify: bool = True):
        self.reader = ShardReader(cache_dir, in_memory=in_memory, verify=verify)
        current = self.reader.index.get("current")
        if not current:
            raise CacheError(f"{cache_dir}: not a text-embedding cache; build it with `finetune cache CONFIG`")
        self.text_identity = current["text_identity"]
        self.long_captions, self.dtype = current["long_captions"], current["dtype"]
        self.max_chunks = int(current["max_chunks"])
        self._keys: dict[str, str] = {}
        self._empty: torch.Tensor | None = None

    def key(self, caption: str) -> str:
        key = self._keys.get(caption)
        if key is None:  # memoized: a DataLoader asks for the same captions every epoch
            key = self._keys[caption] = text_key(caption, self.text_identity, self.long_captions, self.dtype)
        return key

    def __contains__(self, caption: str) -> bool:
        return self.key(caption) in self.reader

    def get(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.reader.get(self.key(caption))
        embeds, pooled = entry["prompt_embeds"], entry["pooled_prompt_embeds"]
        missing = self.max_chunks - embeds.shape[0] // CONTEXT_LENGTH
        if missing > 0:
            if self._empty is None:
                self._empty = self.reader.get(self.key(""))["prompt_embeds"]
            embeds = torch.cat([embeds, *[self._empty] * missing], dim=0)
        return embeds, pooled
