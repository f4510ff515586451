"""SDXL embedding files: `clip_l` (n, 768) + `clip_g` (n, 1280), standalone or bundled in a LoRA.

The standalone file is what A1111/Forge and ComfyUI (`embedding:<name>`) load, and what diffusers'
`load_textual_inversion` takes one encoder at a time. Inside a LoRA the same tensors are
`bundle_emb.<token>.clip_l` / `.clip_g` (OneTrainer's layout, which A1111 reads).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from finetune.adapters.embeddings import ENCODERS, file_stem
from finetune.errors import ModelError
from finetune.io import atomic_file

BUNDLE_PREFIX = "bundle_emb."
ARCHITECTURE = "stable-diffusion-xl-v1-base/textual-inversion"
DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def word_metadata(word, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The file's header: the word, its vector count and init word, with modelspec's architecture."""
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": ARCHITECTURE,
            "modelspec.title": file_stem(word.token), "token": word.token, "vectors": str(word.vectors),
            "init_word": word.init_word or "", "encoders": ",".join(word.encoders), **(extra or {})}


def save_embedding(path: Path, vectors: dict[str, torch.Tensor], metadata: dict[str, str],
                   dtype: torch.dtype = torch.float32) -> Path:
    """One word's `{"clip_l": (n, C1), "clip_g": (n, C2)}`, written atomically and byte-reproducibly."""
    tensors = {key: vectors[key].detach().to("cpu", dtype).contiguous() for key in ENCODERS}
    with atomic_file(Path(path)) as tmp:
        tmp.write_bytes(safetensors_bytes(tensors, {k: str(v) for k, v in metadata.items()}))
    return Path(path)


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A .safetensors file with its header in sorted order: the same tensors give the same bytes.

    (The safetensors library writes the metadata in hash-map order, which differs from run to run,
    and a resumed run must write the file an uninterrupted one writes.)
    """
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    data, offset = [], 0
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + len(raw)]}
        data.append(raw)
        offset += len(raw)
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    return len(blob).to_bytes(8, "little") + blob + b"".join(data)


def write_word_files(folder: Path, words, dtype: torch.dtype = torch.float32,
                     extra: dict[str, str] | None = None) -> list[Path]:
    """`<folder>/<token without <>>.safetensors` for every word of `words` (NewWords)."""
    return [save_embedding(Path(folder) / f"{file_stem(word.token)}.safetensors", words.vectors(i),
                           word_metadata(word, extra), dtype)
            for i, word in enumerate(words.words)]


def bundle_tensors(words, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """`bundle_emb.<token>.clip_l` / `.clip_g` of every word, to add to a LoRA file."""
    out = {}
    for i, word in enumerate(words.words):
        for key, value in words.vectors(i).items():
            out[f"{BUNDLE_PREFIX}{word.token}.{key}"] = value.detach().to("cpu", dtype).contiguous()
    return out


def split_bundled(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(the LoRA's own tensors, {token: {"clip_l": ..., "clip_g": ...}}) of a LoRA state dict."""
    lora, bundled = {}, {}
    for key, value in tensors.items():
        if key.startswith(BUNDLE_PREFIX):
            token, _, part = key[len(BUNDLE_PREFIX):].rpartition(".")
            bundled.setdefault(token, {})[part] = value
        else:
            lora[key] = value
    return lora, bundled


def read_embedding(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(`{"clip_l", "clip_g"}` tensors, header) of an SDXL embedding file.

    Raises:
        ModelError: the file is missing or lacks one of the two keys.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: embedding file not found")
    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
        missing = [k for k in ENCODERS if k not in keys]
        if missing:
            raise ModelError(f"{path}: not an SDXL embedding (no {', '.join(missing)}); SD1 embeddings do not fit SDXL")
        return {k: fh.get_tensor(k) for k in ENCODERS}, dict(fh.metadata() or {})


def read_bundled(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The words bundled in a LoRA file, by token (empty when it bundles none)."""
    with safe_open(str(path), framework="pt") as fh:
        keys = [k for k in fh.keys() if k.startswith(BUNDLE_PREFIX)]
        return split_bundled({k: fh.get_tensor(k) for k in keys})[1]
