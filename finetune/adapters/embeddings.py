"""New words in SDXL's two text encoders: added tokens, their embedding rows, and which of them train.

A word `<myDog>` with n vectors becomes the tokens `<myDog>`, `<myDog>_1`, … `<myDog>_{n-1}` (diffusers'
names) in both tokenizers. Their rows are kept as small parameters of their own, outside the frozen
embedding tables: an encoder's token-embedding layer is wrapped so that ids past the table read those
rows. Every other row of the tables is the base weight itself, never handed to an optimizer, so it
stays bitwise unchanged; only the new rows of the encoders a word names get gradients.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from finetune.errors import ConfigError

ENCODERS = ("clip_l", "clip_g")  # the SDXL embedding file's keys, in the pipeline's encoder order
REAL_EOS_ID = 49407  # CLIP's <|endoftext|>


def token_names(token: str, vectors: int) -> list[str]:
    """The tokens of one word: diffusers' `<tok>`, `<tok>_1`, … (what `load_textual_inversion` adds)."""
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


def file_stem(token: str) -> str:
    """`<myDog>` -> `myDog`: the embedding file's name, which ComfyUI's `embedding:myDog` looks up."""
    return token.strip("<>")


def _word_pattern(token: str) -> re.Pattern:
    # Neither a later vector's name (`<tok>_1`) nor the start of an already expanded word.
    return re.compile(re.escape(token) + r"(?!_\d)(?! " + re.escape(token) + r"_1)")


def expand_prompt(text: str, words: Sequence) -> str:
    """Each multi-vector word written out as its tokens, as diffusers' `maybe_convert_prompt` does."""
    for word in words:
        if word.vectors > 1:
            text = _word_pattern(word.token).sub(" ".join(token_names(word.token, word.vectors)), text)
    return text


def mentions(text: str, words: Sequence) -> bool:
    """Whether `text` holds one of the words (such a caption cannot come from the text cache)."""
    return any(word.token in text for word in words)


class RowsEmbedding(nn.Module):
    """A token-embedding layer whose ids past the frozen table read the new words' rows instead."""

    def __init__(self, base: nn.Embedding, rows: list[nn.Parameter]):
        super().__init__()
        self.base = base
        self.rows = rows  # a plain list: the parameters belong to NewWords, not to the encoder
        self.first_new_id = base.num_embeddings

    @property
    def weight(self) -> torch.Tensor:
        """The table with the new rows appended (what a merged checkpoint stores)."""
        return torch.cat([self.base.weight, *[r.to(self.base.weight.dtype) for r in self.rows]])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        new = input_ids >= self.first_new_id
        known = self.base(input_ids.clamp(max=self.first_new_id - 1))  # (B, T, C)
        rows = torch.cat(list(self.rows)).to(known.dtype)  # (new tokens, C)
        # torch.where, not a masked copy: no host sync, and gradient reaches only the rows the ids use.
        picked = rows[(input_ids - self.first_new_id).clamp(min=0)]
        return torch.where(new[..., None], picked, known)


class NewWords(nn.Module):
    """The words' rows, one parameter per (encoder, word); what the optimizer and checkpoints see.

    `state_dict` keys are `<encoder>__<word index>`; a checkpoint holds these and nothing of the tables.
    """

    def __init__(self, words: Sequence, rows: dict[str, list[torch.Tensor]]):
        super().__init__()
        self.words = list(words)
        self.rows = nn.ParameterDict()
        for encoder in ENCODERS:
            for i, (word, value) in enumerate(zip(self.words, rows[encoder])):
                trained = encoder in word.encoders
                self.rows[f"{encoder}__{i}"] = nn.Parameter(value.detach().float().clone(), requires_grad=trained)
        self._trained = [p for p in self.rows.values() if p.requires_grad]

    def encoder_rows(self, encoder: str) -> list[nn.Parameter]:
        return [self.rows[f"{encoder}__{i}"] for i in range(len(self.words))]

    def trained_parameters(self) -> list[nn.Parameter]:
        return list(self._trained)

    def set_training(self, on: bool) -> None:
        """Freeze (pivotal tuning's stop step) or unfreeze the trained rows; frozen rows get no gradient,
        so the optimizer skips them (no update, no weight decay)."""
        for param in self._trained:
            param.requires_grad_(on)

    def vectors(self, word_index: int) -> dict[str, torch.Tensor]:
        """{"clip_l": (n, 768), "clip_g": (n, 1280)} of one word (the file's tensors)."""
        return {encoder: self.rows[f"{encoder}__{word_index}"].detach() for encoder in ENCODERS}

    def expand(self, text: str) -> str:
        return expand_prompt(text, self.words)

    def describe(self) -> str:
        """One line for the plan: the words and what they train."""
        parts = [f"{w.token} ({w.vectors} vector{'s' * (w.vectors > 1)}, "
                 f"{'from ' + repr(w.init_word) if w.init_word else 'random init'}, {'+'.join(w.encoders)})"
                 for w in self.words]
        return "new words: " + ", ".join(parts)


def initial_rows(words: Sequence, tokenizer, table: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
    """Each word's starting vectors (n, C) from one encoder's table: its init word's token rows
    (repeated or cut to n, as kohya does), or random at the table's own spread."""
    out = []
    for word in words:
        if word.init_word:
            ids = tokenizer(word.init_word, add_special_tokens=False).input_ids
            if not ids:
                raise ConfigError(f"embeddings: init_word = {word.init_word!r} for {word.token} gives no tokens; "
                                  "use a plain word such as \"dog\"")
            out.append(table[[ids[i % len(ids)] for i in range(word.vectors)]].detach().float().clone())
        else:
            std = table.float().std()
            out.append(torch.randn(word.vectors, table.shape[1], generator=generator) * std)
    return out


def add_tokens(tokenizers: Sequence, words: Sequence) -> None:
    """Add every word's tokens to both tokenizers, with the same new ids in each.

    Raises:
        ConfigError: a token is already in a vocabulary (naming it and the fix).
    """
    names = [name for word in words for name in token_names(word.token, word.vectors)]
    for tokenizer in tokenizers:
        vocab = tokenizer.get_vocab()
        taken = [name for name in names if name in vocab]
        if taken:
            raise ConfigError(f"embeddings: {', '.join(taken)} already in the tokenizer's vocabulary; pick a token "
                              "no word of CLIP's uses, e.g. \"<myDog>\"")
    first = [len(tok) for tok in tokenizers]
    for tokenizer in tokenizers:
        tokenizer.add_tokens(names, special_tokens=False)
    ids = [tok.convert_tokens_to_ids(names) for tok in tokenizers]
    if len(set(first)) != 1 or any(i != list(range(first[0], first[0] + len(names))) for i in ids):
        raise ConfigError("embeddings: the two tokenizers gave the new tokens different ids; use SDXL's "
                          "tokenizers (the same CLIP vocabulary in both)")


def use_real_eos(text_encoder) -> None:
    """Pool at the first `<|endoftext|>` (49407), not at the largest id.

    SDXL's configs carry the legacy `eos_token_id = 2`, with which transformers pools at `argmax(ids)`:
    added tokens (ids >= 49408) would take the pooled output over. The attribute is copied from the
    config at init, so set it on the modules; the config gets it too, for saved copies.
    """
    for module in text_encoder.modules():
        if hasattr(module, "eos_token_id") and not isinstance(module, RowsEmbedding):
            module.eos_token_id = REAL_EOS_ID
    text_encoder.config.eos_token_id = REAL_EOS_ID


def add_new_words(tokenizers: Sequence, text_encoders: Sequence, words: Sequence, seed: int) -> NewWords | None:
    """Add `words` (the [[embeddings]] tables) to SDXL's tokenizers and text encoders; None without words.

    Call after the text cache is built: captions without the words encode the same before and after,
    and the cache stays keyed by the unmodified models.
    """
    if not words:
        return None
    if len(tokenizers) != 2 or len(text_encoders) != 2:
        raise ConfigError("[[embeddings]] need SDXL base's two text encoders (the refiner has one): train "
                          "new words on the base, or remove the [[embeddings]] tables")
    first = len(tokenizers[0])
    for encoder in text_encoders:
        if encoder.get_input_embeddings().num_embeddings != first:
            raise ConfigError(f"embeddings: the text encoder's table has {encoder.get_input_embeddings().num_embeddings}"
                              f" rows but the tokenizer {first} ids; the model's tokenizer and encoder do not match")
    generator = torch.Generator().manual_seed(seed)
    rows = {encoder: initial_rows(words, tokenizers[0], te.get_input_embeddings().weight, generator)
            for encoder, te in zip(ENCODERS, text_encoders)}
    add_tokens(tokenizers, words)
    new_words = NewWords(words, rows)
    for encoder, te in zip(ENCODERS, text_encoders):
        te.requires_grad_(False)  # frozen: gradient flows through the encoder into the new rows only
        base = te.get_input_embeddings()
        te.set_input_embeddings(RowsEmbedding(base, new_words.encoder_rows(encoder)))
        use_real_eos(te)
        new_words.to(base.weight.device)
    return new_words
