"""Turn CLIP's public BPE table (`bpe_simple_vocab_16e6.txt.gz`) into tokenizer files.

The table ships inside the `open-clip-torch` wheel (MIT). Get it without installing that package
(it needs torchvision) and write `vocab.json` + `merges.txt`, the files `CLIPTokenizer` reads:

    pip download --no-deps open-clip-torch==3.3.0 -d /tmp/oc
    python scripts/make_clip_tokenizer.py /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl \
        finetune/models/data/tokenizer

The result tokenizes like CLIP ViT-L/14: "a photo of a cat" -> 49406, 320, 1125, 539, 320, 2368, 49407.
"""

from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path

# CLIP keeps the first 48,894 merges of the table: 49,408 ids = 256 bytes × 2 (plain and
# word-final) + 48,894 merges + 2 special tokens.
NUM_MERGES = 49152 - 256 - 2
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"


def byte_alphabet() -> list[str]:
    """The 256 printable characters GPT-2/CLIP byte-level BPE uses for the 256 byte values, in id order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    shift = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + shift)
            shift += 1
    return [chr(c) for c in codes]


def read_table(source: Path) -> list[str]:
    """Lines of the BPE table, read from the `.txt.gz` itself or from inside the wheel."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            raw = wheel.read(BPE_MEMBER)
    else:
        raw = source.read_bytes()
    return gzip.decompress(raw).decode("utf-8").split("\n")


def build(lines: list[str]) -> tuple[dict[str, int], list[str]]:
    """Vocabulary (token -> id) and merge lines ("a b"), CLIP's ordering."""
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is the table's version header
    alphabet = byte_alphabet()
    tokens = alphabet + [ch + "</w>" for ch in alphabet]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the open-clip-torch wheel or bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("out", type=Path, help="folder for vocab.json and merges.txt")
    args = parser.parse_args()
    vocab, merges = build(read_table(args.source))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (args.out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()
