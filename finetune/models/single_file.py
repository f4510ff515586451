"""Single-file SDXL checkpoints (SGM layout, as A1111/ComfyUI use them): offline loading and writing.

Loading goes through diffusers' `from_single_file` with a local config folder (it reaches for the
hub without one). Writing is ours (diffusers ships no diffusers -> SGM converter): UNet names via
`sgm_keys`, VAE and text encoders by the small tables below.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from finetune.errors import ModelError
from finetune.io import atomic_dir, atomic_file, read_safetensors_header
from finetune.models.configs import materialize_config_folder
from finetune.models.refiner import kind_of_keys, refiner_config_dir
from finetune.models.sgm_keys import unet_state_dict_to_sgm
from finetune.models.tiny import build_tiny_pipeline, materialize_tiny_config_folder, tiny_unet_config

# diffusers is imported inside the functions that use it: importing it takes seconds.

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."
# Keys diffusers' single-file loader looks for to recognise each SDXL text encoder.
TE1_MARKER = TE1_PREFIX + "text_model.embeddings.position_embedding.weight"
TE2_MARKER = TE2_PREFIX + "positional_embedding"
# The refiner's lone bigG encoder sits at embedders.0, in OpenCLIP names like the base's embedders.1.
REFINER_TE_PREFIX = "conditioner.embedders.0.model."
REFINER_TE_MARKER = REFINER_TE_PREFIX + "positional_embedding"


# --- config folder -------------------------------------------------------------------------------

def default_config_dir(kind: str = "sdxl_base") -> Path:
    """The configs and tokenizers of `kind` (SDXL base, or the tiny test model), materialized once into the
    user cache (XDG_CACHE_HOME respected)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    target = cache / "sdxl-finetune" / kind
    if not ((target / "model_index.json").is_file() and (target / "tokenizer_2").is_dir()):
        # Built aside and renamed: two processes starting at once never see half a folder.
        with atomic_dir(target) as tmp:
            (materialize_tiny_config_folder if kind == "tiny_sdxl" else materialize_config_folder)(tmp)
    return target


def architecture_of(shapes: dict[str, tuple[int, ...]]) -> str:
    """Which known SDXL architecture a single file holds, from its tensor shapes: "sdxl_base" or "tiny_sdxl"."""
    first_conv = shapes.get(f"{UNET_PREFIX}input_blocks.0.0.weight", (0,))
    return "tiny_sdxl" if first_conv[0] == tiny_unet_config()["block_out_channels"][0] else "sdxl_base"


# --- reading and checking ------------------------------------------------------------------------

def read_shapes(path: Path, *, allow_pickle: bool = False) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in a .safetensors (header only) or, if allowed, a pickled checkpoint.

    Raises:
        ModelError: a pickle without `allow_pickle`, or a file that cannot be read.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return {k: tuple(v.shape) for k, v in _load_pickle(path, allow_pickle).items()}
    return {k: tuple(entry["shape"]) for k, entry in read_safetensors_header(path)[0].items()}


def _load_pickle(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise ModelError(f"{path}: pickled checkpoints ({path.suffix}) can run code when opened and are refused; "
                         "convert it to .safetensors, or set model.allow_pickle = true if you trust its source")
    log.warning("%s: opening a pickled checkpoint (weights_only=True)", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # weights_only refuses anything but tensors and plain containers
        raise ModelError(f"{path}: could not read the pickled checkpoint safely ({err})") from None
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def check_sdxl_keys(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise ModelError naming `path` and what it holds unless it is a full SDXL base or refiner checkpoint."""
    keys = shapes.keys()
    sdxl_unet = f"{UNET_PREFIX}label_emb.0.0.weight" in keys
    if sdxl_unet and TE1_MARKER in keys and TE2_MARKER in keys:
        return
    if sdxl_unet and REFINER_TE_MARKER in keys and not any(k.startswith("conditioner.embedders.1.") for k in keys):
        return
    raise ModelError(f"{path}: not an SDXL single-file checkpoint: {describe_keys(shapes)}; "
                     "expected model.diffusion_model.*, conditioner.embedders.0/1.* and first_stage_model.* keys")


def describe_keys(shapes: dict[str, tuple[int, ...]]) -> str:
    """A short account of what a state dict holds, for error messages."""
    keys = list(shapes)
    if not keys:
        return "it holds no tensors"
    if any(k.startswith("cond_stage_model.") for k in keys):
        return "found SD 1.x/2.x keys (cond_stage_model.*)"
    if any(k.startswith("lora_") or ".lora_" in k for k in keys):
        return "found LoRA keys (merge it with `finetune merge` instead)"
    if any(k.startswith(REFINER_TE_PREFIX) for k in keys) and not any(k.startswith(UNET_PREFIX) for k in keys):
        return "found only the refiner's OpenCLIP text encoder (conditioner.embedders.0.model)"
    if any(k.startswith(UNET_PREFIX) for k in keys) and f"{UNET_PREFIX}label_emb.0.0.weight" not in shapes:
        return "found a UNet without SDXL's micro-conditioning embedding (label_emb): SD 1.x/2.x?"
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return "found a UNet but not both SDXL text encoders (conditioner.embedders.0/1)"
    if any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.")) for k in keys):
        return "found diffusers-named keys (a component file of a diffusers folder: point at the folder)"
    if any(k.startswith(("first_stage_model.", "encoder.down.")) for k in keys):
        return "found only a VAE (set it as model.vae)"
    return f"found {len(keys)} keys such as {', '.join(sorted(keys)[:3])}"


# --- loading -------------------------------------------------------------------------------------

def single_file_kind(path: Path, *, allow_pickle: bool = False) -> str:
    """"base" or "refiner" for an SGM checkpoint, from its keys (ModelError naming the file for anything else)."""
    shapes = read_shapes(Path(path), allow_pickle=allow_pickle)
    check_sdxl_keys(Path(path), shapes)
    return kind_of_keys(shapes) or "base"


def load_single_file_pipeline(path: Path, *, allow_pickle: bool = False, dtype: torch.dtype = torch.float32,
                              config_dir: Path | None = None, kind: str | None = None):
    """A `StableDiffusionXLPipeline` (base) or `StableDiffusionXLImg2ImgPipeline` (refiner) from one SGM file, offline.

    Args:
        config_dir: a diffusers folder whose configs and tokenizers describe the model (model.config;
            default: SDXL base's or refiner's, or the tiny model's when the shapes say so, materialized
            into the user cache).
        kind: "base" or "refiner" (default: read from the file's keys).

    Raises:
        ModelError: a refused pickle, a file that is not SDXL, or a load that fails (naming the file).
    """
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint file not found")
    shapes = read_shapes(path, allow_pickle=allow_pickle)
    check_sdxl_keys(path, shapes)
    kind = kind or kind_of_keys(shapes) or "base"
    if config_dir is None:
        config_dir = refiner_config_dir() if kind == "refiner" else default_config_dir(architecture_of(shapes))
    config_dir = Path(config_dir)
    pipeline_class = StableDiffusionXLImg2ImgPipeline if kind == "refiner" else StableDiffusionXLPipeline
    try:
        # diffusers reads pickles with torch.load(weights_only=True) itself; the opt-in was checked above.
        return pipeline_class.from_single_file(
            str(path), config=str(config_dir), local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"{path}: diffusers could not load it as SDXL with the configs in {config_dir}: {err}; if it "
                         "is not SDXL base's architecture, set model.config to a diffusers folder that describes it") from None


def load_vae(path: Path, *, dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
             config_dir: Path | None = None):
    """An `AutoencoderKL` from a diffusers folder, a diffusers-keyed file, or an SGM file (prefixed or bare keys).

    Raises:
        ModelError: naming the path and what it holds when it is no VAE we can read.
    """
    from diffusers import AutoencoderKL

    path = Path(path)
    if path.is_dir():
        folder = path if (path / "config.json").is_file() else path / "vae"
        if not (folder / "config.json").is_file():
            raise ModelError(f"{path}: no VAE config.json here or in vae/ (point model.vae at a VAE folder or file)")
        return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    if not path.is_file():
        raise ModelError(f"{path}: VAE not found")
    shapes = read_shapes(path, allow_pickle=allow_pickle)
    config_dir = Path(config_dir) if config_dir is not None else default_config_dir()
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in shapes):
        return _load_diffusers_vae_file(path, config_dir, dtype, allow_pickle)
    if not any(k.startswith((VAE_PREFIX + "encoder.down.", "encoder.down.")) for k in shapes):
        raise ModelError(f"{path}: not a VAE: {describe_keys(shapes)}")
    try:
        return AutoencoderKL.from_single_file(str(path), config=str(config_dir), subfolder="vae",
                                              local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"{path}: could not load the VAE with the config in {config_dir / 'vae'}: {err}") from None


def _load_diffusers_vae_file(path: Path, config_dir: Path, dtype, allow_pickle: bool):
    from diffusers import AutoencoderKL

    state = _load_pickle(path, allow_pickle) if path.suffix.lower() in PICKLE_SUFFIXES else load_file(str(path))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
    try:
        vae.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelError(f"{path}: the VAE weights do not fit the config in {config_dir / 'vae'}: {err}") from None
    return vae.to(dtype).eval()


# --- writing: diffusers -> SGM names ---------------------------------------------------------------

VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key_to_sgm(key: str, num_levels: int) -> str:
    """SGM name of one diffusers AutoencoderKL weight (the decoder's up blocks run in reverse order)."""
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    up = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.", key)
    if up:
        inner = "block." if up.group(2) == "resnets" else "upsample."
        key = f"decoder.up.{num_levels - 1 - int(up.group(1))}.{inner}" + key[up.end():]
    key = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", key)
    attn = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.", key)
    if attn:
        key = f"{attn.group(1)}.mid.attn_1.{VAE_ATTENTION[attn.group(2)]}." + key[attn.end():]
    key = key.replace(".conv_shortcut.", ".nin_shortcut.")
    return re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)


def vae_state_dict_to_sgm(state_dict: dict, num_levels: int) -> dict:
    """diffusers VAE weights -> SGM names; attention projections become 1x1 convs as SGM stores them."""
    out = {}
    for key, tensor in state_dict.items():
        new = vae_key_to_sgm(key, num_levels)
        if ".mid.attn_1." in new and new.endswith(".weight") and tensor.dim() == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)  # (C, C) -> (C, C, 1, 1)
        out[new] = tensor
    return out


OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                  "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
OPENCLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                "text_model.embeddings.position_embedding.weight": "positional_embedding",
                "text_model.final_layer_norm.weight": "ln_final.weight",
                "text_model.final_layer_norm.bias": "ln_final.bias"}


def te1_state_dict_to_sgm(state_dict: dict) -> dict:
    """HF CLIP names under the `text_model.` level (transformers 5's CLIPTextModel lacks it: add it)."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state_dict.items()
            if not k.endswith("position_ids")}


def te2_state_dict_to_openclip(state_dict: dict) -> dict:
    """CLIPTextModelWithProjection weights -> OpenCLIP names (q, k, v fused into in_proj; projection transposed)."""
    out, qkv = {}, {}
    for key, tensor in state_dict.items():
        if key in OPENCLIP_TOP:
            out[OPENCLIP_TOP[key]] = tensor
        elif key == "text_projection.weight":
            out["text_projection"] = tensor.T.contiguous()  # OpenCLIP applies x @ P, HF applies Linear (x @ W.T)
        elif m := re.match(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key):
            layer, sub, leaf = m.groups()
            prefix = f"transformer.resblocks.{layer}"
            if sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((prefix, leaf), {})[sub[10]] = tensor
            else:
                out[f"{prefix}.{OPENCLIP_LAYER[sub]}.{leaf}"] = tensor
        elif not key.endswith("position_ids"):
            raise KeyError(f"text encoder 2 weight {key} has no OpenCLIP name")
    for (prefix, leaf), parts in qkv.items():
        out[f"{prefix}.attn.in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def sgm_state_dict(parts) -> dict[str, torch.Tensor]:
    """One SGM-keyed state dict from anything with .unet, .vae, .text_encoder (None: a refiner), .text_encoder_2."""
    state = {}
    unet = unet_state_dict_to_sgm(parts.unet.state_dict(), dict(parts.unet.config))
    state.update({UNET_PREFIX + k: v for k, v in unet.items()})
    levels = len(parts.vae.config.block_out_channels)
    state.update({VAE_PREFIX + k: v for k, v in vae_state_dict_to_sgm(parts.vae.state_dict(), levels).items()})
    bigg = te2_state_dict_to_openclip(parts.text_encoder_2.state_dict())
    if getattr(parts, "text_encoder", None) is None:  # the refiner: bigG alone, at embedders.0
        state.update({REFINER_TE_PREFIX + k: v for k, v in bigg.items()})
        return state
    state.update({TE1_PREFIX + k: v for k, v in te1_state_dict_to_sgm(parts.text_encoder.state_dict()).items()})
    state.update({TE2_PREFIX + k: v for k, v in bigg.items()})
    return state


def save_single_file(pipe_or_parts, path: Path, *, dtype: torch.dtype | None = None,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write SDXL as one SGM-layout .safetensors (what A1111/Forge/ComfyUI open), atomically.

    Args:
        pipe_or_parts: a StableDiffusionXLPipeline, `SDXLModels`, or anything with its four models.
        dtype: cast floating weights to this dtype (default: as they are).
    """
    state = {}
    for key, tensor in sgm_state_dict(pipe_or_parts).items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.contiguous()
    path = Path(path)
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", **(metadata or {})})
    return path


def save_tiny_single_file(out: Path, seed: int = 0) -> Path:
    """The tiny model as one SGM single file (as A1111/ComfyUI checkpoints are), for testing that path offline."""
    return save_single_file(build_tiny_pipeline(seed), out)
