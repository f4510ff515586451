"""Cache keys: what produced an entry (model identities, image fingerprint, caption, dtypes), hashed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch

# Tensors up to this many elements are hashed whole; bigger ones by a deterministic sample
# (the first, last and an evenly strided set of SAMPLE_ELEMENTS elements each). Any fine-tune,
# re-seed or dtype change moves all of those, and hashing the whole of SDXL's 3.5 GB on every
# start would cost seconds and a full GPU->CPU copy. Names, shapes and dtypes are always hashed.
WHOLE_TENSOR_ELEMENTS = 1 << 16
SAMPLE_ELEMENTS = 4096
KEY_VERSION = "1"  # bump when what a key covers or how entries are computed changes


def _digest(*parts) -> str:
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1)
    if flat.numel() > WHOLE_TENSOR_ELEMENTS:
        n = SAMPLE_ELEMENTS
        stride = torch.arange(0, flat.numel(), max(1, flat.numel() // n), device=flat.device)[:n]
        flat = torch.cat([flat[:n], flat[stride], flat[-n:]])
    # Raw bytes (not values) so the dtype counts and bf16 needs no numpy support.
    return flat.contiguous().cpu().view(torch.uint8).numpy().tobytes()


def _config_dict(module) -> dict:
    config = getattr(module, "config", None)
    if config is None:
        return {}
    if hasattr(config, "to_dict"):  # transformers PretrainedConfig
        config = config.to_dict()
    # Library versions and paths say nothing about the weights' behaviour.
    return {k: v for k, v in dict(config).items() if not k.startswith("_") and k != "transformers_version"}


def module_identity(module: torch.nn.Module) -> str:
    """sha256 over the module's class, config and weights (sampled as described above)."""
    h = hashlib.sha256()
    h.update(type(module).__name__.encode())
    h.update(json.dumps(_config_dict(module), sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(_tensor_bytes(tensor))
    return h.hexdigest()


def tokenizer_identity(tokenizer) -> str:
    """sha256 over the tokenizer's class, vocabulary, special tokens and context length."""
    vocab = sorted(tokenizer.get_vocab().items())
    specials = {
        "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id, "max_length": tokenizer.model_max_length,
    }
    return _digest(type(tokenizer).__name__, specials, vocab)


def vae_encode_dtype(vae) -> torch.dtype:
    """SDXL's VAE overflows in fp16: encode in fp32 unless its config says `force_upcast: false`."""
    dtype = next(vae.parameters()).dtype
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", True):
        return torch.float32
    return dtype


def vae_identity(vae) -> str:
    """Identity of the VAE and the precision it encodes in (which its weights' dtype and config decide)."""
    return _digest("vae", module_identity(vae), str(vae_encode_dtype(vae)))


def text_identity(tokenizers: Sequence, text_encoders: Sequence) -> str:
    """Identity of both tokenizers and both text encoders."""
    return _digest("text", [tokenizer_identity(t) for t in tokenizers], [module_identity(e) for e in text_encoders])


def latent_key(fingerprint: str, bucket: Sequence[int], crop_top_left: Sequence[int], flip: bool,
               vae_id: str, dtype: str, store_std: bool, alpha_color: Sequence[int] = (255, 255, 255)) -> str:
    """One latent entry: the image (by fingerprint) as cut for its bucket, and how it was encoded and stored."""
    return _digest(KEY_VERSION, "latent", fingerprint, list(bucket), list(crop_top_left), bool(flip),
                   vae_id, dtype, bool(store_std), list(alpha_color))


def text_key(caption: str, text_id: str, long_captions: str, dtype: str) -> str:
    """One text entry: the caption and how it was encoded and stored."""
    return _digest(KEY_VERSION, "text", caption, text_id, long_captions, dtype)
