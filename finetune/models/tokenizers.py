"""CLIP tokenizers from the BPE files shipped with the package: no hub access, ever."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

# transformers is imported where a tokenizer is loaded: importing it takes seconds.

MAX_LENGTH = 77


def _data_dir() -> Path:
    return Path(str(resources.files("finetune.models") / "data" / "tokenizer"))


def load_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """CLIP ViT-L/14's tokenizer. SDXL's first tokenizer pads with `<|endoftext|>`, the second with `!`."""
    from transformers import CLIPTokenizer

    data = _data_dir()
    # Positional: transformers 5 ignores the `vocab_file=`/`merges_file=` keywords here and builds
    # an empty vocabulary without a word of warning.
    return CLIPTokenizer(
        str(data / "vocab.json"),
        str(data / "merges.txt"),
        pad_token=pad_token,
        model_max_length=MAX_LENGTH,
    )


def clip_token_counter() -> Callable[[str], int]:
    """Counts a caption's CLIP tokens (without BOS/EOS) as `load_clip_tokenizer()` does, from the same files.

    Built with the `tokenizers` library alone, the way transformers' `CLIPTokenizer` builds its own,
    so `dataset inspect` and `dataset build` can warn about long captions without importing transformers.
    """
    data = _data_dir()
    vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in (data / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
              if line.strip()]  # the first line is a version header
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                              fuse_unk=False, unk_token="<|endoftext|>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                 normalizers.Lowercase()])
    words = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in ("<|startoftext|>", "<|endoftext|>")])
    return lambda caption: len(tokenizer.encode(caption, add_special_tokens=False).ids)


def save_clip_tokenizer(out: Path, pad_token: str) -> None:
    """Write a tokenizer folder (`vocab.json`, `merges.txt`, config) that `CLIPTokenizer.from_pretrained` reads."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    load_clip_tokenizer(pad_token).save_pretrained(str(out))
