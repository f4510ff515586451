"""CLIP tokenizers from the BPE files shipped with the package: no hub access, ever."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

# transformers is imported where a tokenizer is loaded: importing it takes a second.

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


def save_clip_tokenizer(out: Path, pad_token: str) -> None:
    """Write a tokenizer folder (`vocab.json`, `merges.txt`, config) that `CLIPTokenizer.from_pretrained` reads."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    load_clip_tokenizer(pad_token).save_pretrained(str(out))
