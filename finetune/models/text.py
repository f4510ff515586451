"""SDXL text conditioning: captions -> (prompt_embeds, pooled_prompt_embeds), as diffusers' pipeline computes them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from finetune.errors import ConfigError
from finetune.models.weighted import apply_emphasis, weighted_ids, weighted_token_count

LONG_CAPTION_MODES = ("truncate", "chunk")
# CLIP's context is 77 tokens: BOS + 75 caption tokens + EOS.
CONTEXT_LENGTH = 77
WINDOW = CONTEXT_LENGTH - 2


def count_tokens(tokenizer, caption: str) -> int:
    """Caption tokens without BOS/EOS; over 75 means truncation (or more than one chunk)."""
    return len(_caption_ids(tokenizer, [caption])[0])


def num_chunks(tokenizer, caption: str, weighted: bool = False) -> int:
    """How many 75-token windows `caption` takes in "chunk" mode (at least one: "" is one empty chunk)."""
    if weighted:
        return max(1, math.ceil(weighted_token_count(tokenizer, caption) / WINDOW))
    return max(1, math.ceil(count_tokens(tokenizer, caption) / WINDOW))


def encode_prompts(
    captions: list[str],
    tokenizers: tuple,
    text_encoders: tuple,
    long_captions: str = "truncate",
    weighted: bool = False,
) -> tuple[Tensor, Tensor]:
    """Encode captions with SDXL's two text encoders.

    Runs under the caller's grad mode (text-encoder training needs gradients; cache builders wrap
    this in `torch.no_grad`).

    Args:
        captions: one string per sample ("" is encoded like any caption, as the pipeline's positive path).
        tokenizers: (tokenizer, tokenizer_2); the refiner's: (tokenizer_2,).
        text_encoders: (CLIPTextModel, CLIPTextModelWithProjection); the refiner's: (CLIPTextModelWithProjection,).
        long_captions: "truncate" (diffusers' behaviour; use `count_tokens` to warn) or "chunk"
            (75-token windows, each wrapped in BOS/EOS and padded to 77, encoded separately and
            concatenated on the sequence axis; every caption of the batch padded with empty chunks
            to the same count; pooled from the first chunk).
        weighted: read A1111 emphasis, `(word:1.2)` / `[word]`, and apply it to the hidden states
            (`finetune.models.weighted`); the pooled embedding stays unweighted.

    Returns:
        prompt_embeds (B, 77*k, C1+C2): penultimate hidden states of both encoders, concatenated;
        pooled_prompt_embeds (B, P): the second encoder's projected text embedding.
    """
    if long_captions not in LONG_CAPTION_MODES:
        raise ConfigError(f"dataset.long_captions = {long_captions!r}: must be one of {', '.join(LONG_CAPTION_MODES)}")
    if len(tokenizers) != len(text_encoders) or len(tokenizers) not in (1, 2):
        raise ValueError("encode_prompts needs SDXL's two tokenizers and encoders (the refiner's: bigG's alone)")
    captions = list(captions)
    if long_captions == "truncate":
        chunks = 1
        ids = [_truncated_ids(tok, captions) for tok in tokenizers] if not weighted else None
    else:
        chunks = max(num_chunks(tok, c, weighted) for tok in tokenizers for c in captions) if captions else 1
        ids = [_chunked_ids(tok, captions, chunks) for tok in tokenizers] if not weighted else None
    multipliers = [None] * len(tokenizers)  # one per encoder (the refiner has bigG alone)
    if weighted:
        ids, multipliers = zip(*(weighted_ids(tok, captions, None if long_captions == "truncate" else chunks)
                                 for tok in tokenizers))

    hidden, pooled = [], None
    for input_ids, scale, encoder in zip(ids, multipliers, text_encoders):
        # (B * k, 77): every chunk is an independent CLIP sequence.
        out = encoder(input_ids.to(_device(encoder)), output_hidden_states=True)
        states = out.hidden_states[-2]  # (B * k, 77, C): penultimate layer, as SDXL was trained
        if scale is not None:
            states = apply_emphasis(states, scale)
        hidden.append(states.reshape(len(captions), chunks * CONTEXT_LENGTH, states.shape[-1]))
        if out[0].ndim == 2:
            # The projection model's first output is text_embeds (B * k, P); keep the first chunk's.
            pooled = out[0].reshape(len(captions), chunks, -1)[:, 0]
    if pooled is None:
        raise ValueError("the second text encoder must be a CLIPTextModelWithProjection (it gives the pooled embedding)")
    prompt_embeds = torch.cat(hidden, dim=-1)
    # The pipeline returns both in the second encoder's dtype; do the same so results match it.
    dtype = pooled.dtype
    return prompt_embeds.to(dtype), pooled


def _truncated_ids(tokenizer, captions: list[str]) -> Tensor:
    # 77, which is SDXL's tokenizers' model_max_length (the pipeline's choice); fixed here so that a
    # tokenizer saved without that setting cannot produce a different length.
    return tokenizer(
        captions, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids


def _caption_ids(tokenizer, captions: Sequence[str]) -> list[list[int]]:
    # verbose=False: a long caption is expected here, not a mistake worth a tokenizer warning.
    return tokenizer(list(captions), add_special_tokens=False, truncation=False, verbose=False).input_ids


def _chunked_ids(tokenizer, captions: list[str], chunks: int) -> Tensor:
    """(B * chunks, 77) ids: each 75-token window wrapped in BOS/EOS and padded with the tokenizer's pad."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = []
    for ids in _caption_ids(tokenizer, captions):
        for i in range(chunks):
            window = ids[i * WINDOW:(i + 1) * WINDOW]
            row = [bos, *window, eos]
            rows.append(row + [pad] * (CONTEXT_LENGTH - len(row)))
    return torch.tensor(rows, dtype=torch.long)


def _device(module) -> torch.device:
    # Works for wrapped modules (DDP, compiled) that lack `.device`.
    return next(module.parameters()).device
