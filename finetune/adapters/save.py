"""Writing a trained adapter: kohya keys by default, diffusers/PEFT keys on request; atomic, with metadata."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from finetune.adapters.keys import kohya_name
from finetune.errors import ConfigError
from finetune.io import atomic_file

# peft and diffusers are imported where they are used: importing them takes seconds.

TE_COMPONENTS = ("te1", "te2")
LOKR_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def adapter_layers(model) -> Iterator[tuple[str, object]]:
    """(module path, peft layer) for every module of `model` carrying the "default" adapter (any variant)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and layer_variant(module) is not None:
            yield name, module


def lora_layers(model) -> Iterator[tuple[str, object]]:
    """(module path, peft LoRA/DoRA layer) for every LoRA-adapted module of `model`."""
    for name, layer in adapter_layers(model):
        if layer_variant(layer) in ("lora", "dora"):
            yield name, layer


def layer_variant(layer) -> str | None:
    """"lora", "dora", "loha" or "lokr" for a peft layer holding the "default" adapter; None otherwise."""
    if "default" in getattr(layer, "lora_A", {}):
        return "dora" if layer.use_dora.get("default") else "lora"
    if "default" in getattr(layer, "hada_w1_a", {}):
        return "loha"
    if "default" in getattr(layer, "lokr_w1", {}) or "default" in getattr(layer, "lokr_w1_a", {}):
        return "lokr"
    return None


def kohya_layer_tensors(layer) -> dict[str, torch.Tensor]:
    """One layer's tensors under kohya/LyCORIS suffixes (`lora_down.weight`, `hada_w1_a`, `lokr_w1`, `alpha`, …)."""
    variant = layer_variant(layer)
    if variant in ("lora", "dora"):
        up = layer.lora_B["default"].weight
        out = {"lora_down.weight": layer.lora_A["default"].weight, "lora_up.weight": up,
               "alpha": torch.tensor(float(layer.lora_alpha["default"]))}
        if variant == "dora":
            # peft's magnitude is one value per output row, LyCORIS' wd_on_out layout (out, 1[, 1, 1]);
            # ComfyUI/Forge detect that axis by the shape (but divide by the base weight's row norm
            # rather than that of W + ΔW, a small difference); A1111 reads only the per-input layout.
            magnitude = layer.lora_magnitude_vector["default"].weight
            out["dora_scale"] = magnitude.reshape(up.shape[0], *[1] * (up.dim() - 1))
        return out
    if variant == "loha":
        out = {k: getattr(layer, k)["default"] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
        return {**out, "alpha": torch.tensor(float(layer.alpha["default"]))}
    return _lokr_tensors(layer)


def _lokr_tensors(layer) -> dict[str, torch.Tensor]:
    out = {k: getattr(layer, k)["default"] for k in LOKR_FACTORS if "default" in getattr(layer, k)}
    if "default" in layer.lokr_t2:
        raise ConfigError("LoKr with use_effective_conv2d has no agreed file layout; train it without")
    if "lokr_w1_b" in out or "lokr_w2_b" in out:
        return {**out, "alpha": torch.tensor(float(layer.alpha["default"]))}
    # Both factors full: LyCORIS and ComfyUI apply no alpha/rank here (LyCORIS writes alpha = rank),
    # while peft scales by alpha/rank; fold peft's scale into w2 so every reader sees the same change.
    out["lokr_w2"] = out["lokr_w2"] * layer.scaling["default"]
    return {**out, "alpha": torch.tensor(float(layer.r["default"]))}


def kohya_state_dict(unet, text_encoders=None, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Tensors by kohya name: `lora_unet_…/lora_te1_…/lora_te2_…` + `.lora_down.weight` (rank, in),
    `.lora_up.weight` (out, rank), `.alpha` (and the DoRA/LoHa/LoKr suffixes ComfyUI and LyCORIS read)."""
    state: dict[str, torch.Tensor] = {}
    parts = [("unet", unet)] + list(zip(TE_COMPONENTS, text_encoders or ()))
    unet_config = dict(unet.config)
    for component, model in parts:
        for path, layer in adapter_layers(model):
            key = kohya_name(component, path, unet_config)
            for suffix, value in kohya_layer_tensors(layer).items():
                # alpha stays fp32 whatever the weights' dtype: it is a scale, not a weight.
                cast = torch.float32 if suffix == "alpha" else dtype
                state[f"{key}.{suffix}"] = value.detach().to("cpu", cast).contiguous()
    return state


def save_diffusers_file(path: Path, unet, text_encoders=None, metadata: dict[str, str] | None = None,
                        dtype: torch.dtype = torch.float32) -> Path:
    """The file `StableDiffusionXLPipeline.save_lora_weights` writes (keys, adapter-config header) + `metadata`."""
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    parts = {"unet": unet, **dict(zip(("text_encoder", "text_encoder_2"), text_encoders or ()))}
    kwargs = {}
    for name, model in parts.items():
        if any(layer_variant(layer) in ("loha", "lokr") for _, layer in adapter_layers(model)):
            raise ConfigError("lora.format = 'diffusers' holds LoRA and DoRA only; "
                              "save LoHa/LoKr with lora.format = 'kohya'")
        state = get_peft_model_state_dict(model)
        kwargs[f"{name}_lora_layers"] = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
        kwargs[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    # diffusers writes into a folder; write there, then add our metadata and move it in atomically.
    with tempfile.TemporaryDirectory(dir=Path(path).parent) as tmp_dir:
        StableDiffusionXLPipeline.save_lora_weights(tmp_dir, weight_name="lora.safetensors", **kwargs)
        with safe_open(str(Path(tmp_dir) / "lora.safetensors"), framework="pt") as fh:
            tensors = {te_magnitude_key(k): fh.get_tensor(k) for k in fh.keys()}
            header = dict(fh.metadata() or {})
        header.update(metadata or {})
        with atomic_file(Path(path)) as tmp:
            save_file(tensors, str(tmp), metadata=header)
    return Path(path)


def te_magnitude_key(key: str) -> str:
    """diffusers' own text-encoder DoRA key, made loadable: `….lora_magnitude_vector` + `.weight`.

    With transformers 5, `load_lora_weights` drops text-encoder magnitudes saved under peft's bare
    name (its loader expects a `.weight` leaf there) and trains on with the fresh norms; with the
    leaf it loads them. UNet keys are left as diffusers writes them (they load).
    """
    if key.startswith("text_encoder") and key.endswith(".lora_magnitude_vector"):
        return key + ".weight"
    return key


def save_adapter(path: Path, unet, text_encoders=None, *, fmt: str = "kohya",
                 metadata: dict[str, str] | None = None, dtype: torch.dtype = torch.float32,
                 extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter of `unet` (and of the text encoders, if given) to `path`, atomically.

    Args:
        fmt: "kohya" (A1111/Forge/ComfyUI names, the default) or "diffusers" (PEFT keys).
        metadata: header strings (see finetune.adapters.metadata.adapter_metadata).
        dtype: dtype of the stored weights (alpha is always fp32).
        extra_tensors: kohya format: more tensors for the file, e.g. `bundle_emb.<token>.clip_l`.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    metadata = {k: str(v) for k, v in (metadata or {}).items()}
    if fmt == "diffusers":
        return save_diffusers_file(Path(path), unet, text_encoders, metadata, dtype)
    if fmt != "kohya":
        raise ConfigError(f"lora.format = {fmt!r}: choose 'kohya' or 'diffusers'")
    state = kohya_state_dict(unet, text_encoders, dtype)
    if not state:
        raise ConfigError("the model carries no adapter to save (was add_unet_adapter called?)")
    state.update(extra_tensors or {})
    metadata["format"] = "pt"
    with atomic_file(Path(path)) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return Path(path)
