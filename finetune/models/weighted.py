"""Weighted captions (dataset.weighted_captions): token ids with per-token multipliers, and A1111's emphasis.

A1111's "Original" emphasis, per 77-token chunk: z' = z·m, then z' scaled by mean(z)/mean(z') so the
chunk's mean is restored. A1111 takes that mean over its whole batch, which is one prompt; here it is
taken per caption and chunk, so a cached embedding never depends on which captions shared its batch.
The pooled embedding stays unweighted, as in A1111 and kohya.
"""

from __future__ import annotations

import torch
from torch import Tensor

from captions.weights import BREAK, parse_weighted

CONTEXT_LENGTH = 77
WINDOW = CONTEXT_LENGTH - 2


def weighted_tokens(tokenizer, caption: str) -> tuple[list[int], list[float]]:
    """Caption token ids (no BOS/EOS) and their weights; a BREAK pads with EOS to the next 75-token window
    (A1111 fills the rest of a chunk the same way, its padding being EOS for CLIP-L)."""
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in parse_weighted(caption):
        if weight == BREAK:
            fill = (-len(ids)) % WINDOW
            ids += [tokenizer.eos_token_id] * fill
            weights += [1.0] * fill
            continue
        if not text:
            continue
        piece = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
        ids += piece
        weights += [weight] * len(piece)
    return ids, weights


def weighted_ids(tokenizer, captions: list[str], chunks: int | None) -> tuple[Tensor, Tensor]:
    """(B * k, 77) ids and multipliers: each 75-token window in BOS/EOS, padded with the tokenizer's pad.

    `chunks`: k windows per caption ("chunk" mode), or None to keep the first window (truncate).
    BOS, EOS and padding weigh 1.0.
    """
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows, multipliers = [], []
    for caption in captions:
        ids, weights = weighted_tokens(tokenizer, caption)
        for i in range(chunks or 1):
            window, scale = ids[i * WINDOW:(i + 1) * WINDOW], weights[i * WINDOW:(i + 1) * WINDOW]
            fill = CONTEXT_LENGTH - len(window) - 2
            rows.append([bos, *window, eos] + [pad] * fill)
            multipliers.append([1.0, *scale, 1.0] + [1.0] * fill)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(multipliers, dtype=torch.float32)


def apply_emphasis(hidden: Tensor, multipliers: Tensor) -> Tensor:
    """A1111's "Original" emphasis on (N, 77, C) hidden states with (N, 77) multipliers, per row (chunk)."""
    multipliers = multipliers.to(hidden.device, hidden.dtype)
    original_mean = hidden.mean(dim=(1, 2), keepdim=True)
    weighted = hidden * multipliers[..., None]
    new_mean = weighted.mean(dim=(1, 2), keepdim=True)
    # Rows with every weight 1 are left bit-identical (no x·(m/m) rounding).
    plain = (multipliers == 1).all(dim=1)[:, None, None]
    return torch.where(plain, hidden, weighted * (original_mean / new_mean))


def weighted_token_count(tokenizer, caption: str) -> int:
    """Tokens of the caption once its weighting syntax is parsed (for the chunk count)."""
    return len(weighted_tokens(tokenizer, caption)[0])
