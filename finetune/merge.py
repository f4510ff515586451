"""Merging LoRAs into a checkpoint in the checkpoint's own layout and dtype (single file or diffusers folder)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.errors import ModelError
from finetune.io import atomic_dir, atomic_file

OPENCLIP_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
OPENCLIP_RENAMES = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def lora_delta(up: torch.Tensor, down: torch.Tensor, alpha: float, scale: float = 1.0) -> torch.Tensor:
    """scale · (alpha / rank) · up @ down in fp32; conv LoRAs (1x1 up, kxk down) give a (out, in, kh, kw) delta."""
    rank = down.shape[0]
    product = up.float().flatten(1) @ down.float().flatten(1)  # (out, in·kh·kw)
    if down.dim() == 4:
        product = product.reshape(up.shape[0], *down.shape[1:])
    return product * (scale * alpha / rank)


@dataclass
class MergeReport:
    out: Path
    merged: dict[str, int] = field(default_factory=dict)  # LoRA file -> modules merged

    def __str__(self) -> str:
        lines = [f"merged into {self.out}:"]
        lines += [f"  {name}: {count} modules" for name, count in self.merged.items()]
        return "\n".join(lines)


def merge_loras(base: Path, loras: list[tuple[Path, float]], out: Path, *, dtype: torch.dtype | None = None) -> MergeReport:
    """Add every LoRA (at its scale) to `base` and write the result to `out` in base's layout.

    Raises:
        ModelError: a LoRA module matches no weight, or its shape does not fit (names both).
    """
    from finetune.adapters.read import read_lora

    base, out = Path(base), Path(out)
    if not base.exists():
        raise ModelError(f"{base}: base model not found")
    unet_config = _unet_config(base)
    deltas: dict[tuple[str, str], list] = {}
    report = MergeReport(out)
    for path, scale in loras:
        lora = read_lora(Path(path), unet_config=unet_config)
        for key, module in lora.modules.items():
            deltas.setdefault(key, []).append((Path(path).name, module, scale))
        report.merged[Path(path).name] = len(lora.modules)
    if base.is_dir():
        _merge_folder(base, out, deltas, unet_config, dtype)
    else:
        _merge_single_file(base, out, deltas, unet_config, dtype)
    return report


def _unet_config(base: Path) -> dict:
    import json

    from finetune.models.configs import sdxl_unet_config

    config = base / "unet" / "config.json"
    return json.loads(config.read_text()) if base.is_dir() and config.is_file() else sdxl_unet_config()


def _apply(name: str, weight: torch.Tensor, adds: list, rows: slice | None = None) -> torch.Tensor:
    """weight + Σ deltas, computed in fp32, checked finite, cast back to the weight's dtype."""
    merged = weight.float().clone()
    target = merged[rows] if rows is not None else merged
    for lora_name, module, scale in adds:
        delta = lora_delta(module.up, module.down, module.alpha, scale)
        if delta.shape != target.shape:
            raise ModelError(f"{lora_name}: {name} has shape {tuple(target.shape)} in the base but the LoRA's update is "
                             f"{tuple(delta.shape)} (a LoRA for another architecture, e.g. SD1.5 on SDXL?)")
        target += delta
    if not torch.isfinite(merged).all():
        raise ModelError(f"{', '.join(a[0] for a in adds)}: merging into {name} gives non-finite values")
    return merged.to(weight.dtype)


# --- diffusers folder ----------------------------------------------------------------------------

FOLDER_COMPONENTS = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}


def _merge_folder(base: Path, out: Path, deltas: dict, unet_config: dict, dtype) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    pending = dict(deltas)
    with atomic_dir(out) as tmp:
        shutil.copytree(base, tmp, dirs_exist_ok=True)
        for component, folder in FOLDER_COMPONENTS.items():
            wanted = {path: adds for (c, path), adds in deltas.items() if c == component}
            if not wanted:
                continue
            for file in sorted((tmp / folder).glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as fh:
                    keys, metadata = list(fh.keys()), fh.metadata()
                    hits = {_folder_key(path, component, keys): path for path in wanted}
                    hits.pop(None, None)
                    if not hits:
                        continue
                    tensors = {k: fh.get_tensor(k) for k in keys}
                for key, path in hits.items():
                    tensors[key] = _apply(key, tensors[key], wanted[path])
                    pending.pop((component, path), None)
                save_file(tensors, str(file), metadata=metadata)
        _refuse_unmatched(pending)


def _folder_key(path: str, component: str, keys: list[str]) -> str | None:
    candidates = [f"{path}.weight"]
    if component != "unet":  # transformers 5 writes CLIPTextModel without the text_model level
        candidates += [f"{path.removeprefix('text_model.')}.weight"]
    return next((k for k in candidates if k in keys), None)


# --- single file (SGM keys) ----------------------------------------------------------------------

def single_file_key(component: str, path: str, unet_config: dict) -> tuple[str, slice | None]:
    """The SGM checkpoint key (and row slice, for OpenCLIP's fused qkv) of one module's weight."""
    from finetune.models.sgm_keys import unet_module_map

    if component == "unet":
        return f"model.diffusion_model.{unet_module_map(unet_config, [path])[path]}.weight", None
    if component == "te1":
        return f"conditioner.embedders.0.transformer.{path}.weight", None
    layer_path = path.removeprefix("text_model.encoder.layers.")
    layer, _, sub = layer_path.partition(".")
    prefix = f"conditioner.embedders.1.model.transformer.resblocks.{layer}"
    if sub in OPENCLIP_QKV:
        return f"{prefix}.attn.in_proj_weight", OPENCLIP_QKV[sub]
    return f"{prefix}.{OPENCLIP_RENAMES.get(sub, sub)}.weight", None


def _merge_single_file(base: Path, out: Path, deltas: dict, unet_config: dict, dtype) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(base), framework="pt") as fh:
        keys, metadata = set(fh.keys()), fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    pending = {}
    for (component, path), adds in deltas.items():
        key, third = single_file_key(component, path, unet_config)
        if key not in keys:
            pending[(component, path)] = adds
            continue
        weight = tensors[key]
        rows = None
        if third is not None:  # q, k, v are thirds of OpenCLIP's in_proj_weight
            size = weight.shape[0] // 3
            rows = slice(third * size, (third + 1) * size)
        tensors[key] = _apply(key, weight, adds, rows)
    _refuse_unmatched(pending)
    with atomic_file(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _refuse_unmatched(pending: dict) -> None:
    if pending:
        shown = ", ".join(f"{c}:{p}" for c, p in sorted(pending)[:8])
        raise ModelError(f"{len(pending)} LoRA module(s) match no weight in the base model (nothing was written): {shown}")
