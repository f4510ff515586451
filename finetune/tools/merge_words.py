"""Merging the words a LoRA bundles (`bundle_emb.<token>.clip_l/clip_g`, pivotal tuning) into a checkpoint.

A diffusers folder takes them whole: the tokens join both tokenizers and the rows join both
embedding tables (with `eos_token_id` set to CLIP's real one, so pooling ignores the new ids). A
single file has no tokenizer to hold them: each word is written as an embedding file beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from finetune.adapters.embedding_files import ARCHITECTURE, read_bundled, save_embedding
from finetune.adapters.embeddings import ENCODERS, REAL_EOS_ID, file_stem, token_names
from finetune.errors import ModelError

# transformers is imported where a tokenizer is edited: importing it takes a second.

FOLDERS = {"clip_l": ("tokenizer", "text_encoder"), "clip_g": ("tokenizer_2", "text_encoder_2")}
TABLE_SUFFIX = "embeddings.token_embedding.weight"


def bundled_words(loras: list[Path]) -> dict[str, dict[str, torch.Tensor]]:
    """The words bundled in the LoRA files, by token; scales do not apply to them.

    Raises:
        ModelError: two files bundle the same token, or a word lacks clip_l or clip_g.
    """
    words: dict[str, dict[str, torch.Tensor]] = {}
    for path in loras:
        for token, tensors in read_bundled(Path(path)).items():
            if token in words:
                raise ModelError(f"{path}: bundles {token}, which another LoRA of this merge bundles too; merge one")
            missing = [k for k in ENCODERS if k not in tensors]
            if missing:
                raise ModelError(f"{path}: bundle_emb.{token} lacks {', '.join(missing)}: not an SDXL embedding")
            words[token] = tensors
    return words


def add_words_to_folder(folder: Path, words: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """Add `words` to the tokenizers and embedding tables of the diffusers folder `folder`, in place.

    Returns:
        one line per word for the merge report.
    """
    from transformers import CLIPTokenizer

    names = [n for token, tensors in words.items() for n in token_names(token, tensors["clip_l"].shape[0])]
    for encoder in ENCODERS:
        tok_dir, te_dir = (folder / part for part in FOLDERS[encoder])
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
        taken = [n for n in names if n in tokenizer.get_vocab()]
        if taken:
            raise ModelError(f"{tok_dir}: already holds {', '.join(taken)}; merge into the base model instead")
        rows = torch.cat([tensors[encoder] for tensors in words.values()])  # (new tokens, C)
        first = _extend_table(te_dir, rows, len(tokenizer))
        tokenizer.add_tokens(names)
        if tokenizer.convert_tokens_to_ids(names) != list(range(first, first + len(names))):
            raise ModelError(f"{tok_dir}: the new tokens did not get the ids of the new rows")
        tokenizer.save_pretrained(str(tok_dir))
    return [f"  {token}: {tensors['clip_l'].shape[0]} vector(s) added to both tokenizers and embedding tables"
            for token, tensors in words.items()]


def _extend_table(te_dir: Path, rows: torch.Tensor, vocab_size: int) -> int:
    """Append `rows` to the encoder's token-embedding table (its weight file rewritten) and update
    its config; the id of the first new row."""
    for file in sorted(te_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            key = next((k for k in fh.keys() if k.endswith(TABLE_SUFFIX)), None)
            if key is None:
                continue
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            metadata = fh.metadata()
        table = tensors[key]
        if table.shape[0] != vocab_size or table.shape[1] != rows.shape[1]:
            raise ModelError(f"{file}: its table is {tuple(table.shape)}, which does not fit a {vocab_size}-token "
                             f"tokenizer and {rows.shape[1]}-wide words (words for another model?)")
        tensors[key] = torch.cat([table, rows.to(table.dtype)])
        save_file(tensors, str(file), metadata=metadata)
        config_path = te_dir / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["vocab_size"] = int(tensors[key].shape[0])
        config["eos_token_id"] = REAL_EOS_ID  # SDXL's legacy 2 would pool at the largest id: a new token
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        return table.shape[0]
    raise ModelError(f"{te_dir}: no .safetensors weight holds the token-embedding table")


def words_beside_paths(out: Path, words: dict) -> list[Path]:
    """Where `write_words_beside` puts each word's embedding file."""
    return [Path(out).parent / "embeddings" / f"{file_stem(token)}.safetensors" for token in words]


def write_words_beside(out: Path, words: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """A single file cannot hold a tokenizer: write `<out's folder>/embeddings/<word>.safetensors` instead."""
    lines = []
    for (token, tensors), path in zip(words.items(), words_beside_paths(out, words)):
        save_embedding(path, tensors, {"modelspec.architecture": ARCHITECTURE, "token": token,
                                       "vectors": str(tensors["clip_l"].shape[0])}, tensors["clip_l"].dtype)
        lines.append(f"  {token}: a single file cannot hold a tokenizer, so the word is not in it; "
                     f"its embedding is {path} (ComfyUI: embedding:{file_stem(token)})")
    return lines
