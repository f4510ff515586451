"""Extracting a LoRA from two checkpoints: truncated SVD of each target weight's difference, kohya keys."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from finetune.adapters.keys import kohya_name, te_path
from finetune.errors import ModelError
from finetune.io import atomic_file, check_output
from finetune.io import read_safetensors_header as read_header
from finetune.models.sgm_keys import unet_module_map
from finetune.tools.merge import FOLDER_COMPONENTS, base_kind, base_unet_config

UNET_PREFIX = "model.diffusion_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
OPENCLIP = re.compile(r"^conditioner\.embedders\.1\.model\.transformer\.resblocks\.(\d+)\."
                      r"(attn\.in_proj_weight|attn\.out_proj\.weight|mlp\.c_fc\.weight|mlp\.c_proj\.weight)$")
OPENCLIP_NAMES = {"attn.out_proj.weight": "self_attn.out_proj", "mlp.c_fc.weight": "mlp.fc1",
                  "mlp.c_proj.weight": "mlp.fc2"}

# Which modules each `targets` choice covers; every set includes the ones before it.
TARGETS = {
    "attn": [r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$"],
    "linear": [r"\.ff\.net\.(0\.proj|2)$", r"\.attentions\.\d+\.(proj_in|proj_out)$", r"\.mlp\.(fc1|fc2)$"],
    "all": [r"\.resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)$", r"\.(down|up)samplers\.0\.conv$"],
}


@dataclass(frozen=True)
class _Loc:
    """Where one module's weight lives: file, key, and row block (OpenCLIP fuses q, k, v into one tensor)."""
    file: Path
    key: str
    rows: int | None = None  # which third of in_proj_weight


@dataclass
class ExtractReport:
    out: Path
    rank: int
    energy: dict[str, float] = field(default_factory=dict)  # kohya module name -> kept σ² / total σ²
    skipped: int = 0  # target modules whose weights are identical in both checkpoints

    def __str__(self) -> str:
        if not self.energy:
            return f"{self.out}: no target weight differs between the checkpoints"
        values = sorted(self.energy.values())
        return (f"extracted {len(values)} modules at rank {self.rank} into {self.out} ({self.skipped} unchanged); "
                f"captured energy: min {values[0]:.3f}, median {values[len(values) // 2]:.3f}, max {values[-1]:.3f}")


def extract_lora(base: Path, tuned: Path, rank: int, out: Path, *, targets: str = "attn",
                 dtype: torch.dtype = torch.float32, overwrite: bool = False) -> ExtractReport:
    """Write a kohya-keyed LoRA approximating `tuned - base` at `rank` on the target modules.

    Args:
        base, tuned: diffusers folders or single-file SGM .safetensors (layouts may differ).
        targets: "attn" (attention projections), "linear" (+ feed-forward, proj_in/out, text MLPs)
            or "all" (+ ResNet convolutions, as conv LoRAs).
        dtype: the dtype of the written up/down matrices.
        overwrite: replace an existing `out` (never one of the checkpoints).

    Raises:
        ConfigError: `out` exists without `overwrite`, or is (inside, or holds) a checkpoint.
        ModelError: a missing or unreadable path, an unknown `targets`, or weights whose shapes differ.
    """
    if targets not in TARGETS:
        raise ModelError(f"targets = {targets!r}: choose one of {', '.join(TARGETS)}")
    if rank < 1:
        raise ModelError(f"rank = {rank}: must be at least 1")
    for path in (base, tuned):
        if not Path(path).exists():
            raise ModelError(f"{path}: checkpoint not found")
    check_output(Path(out), overwrite=overwrite, inputs=[Path(base), Path(tuned)])
    unet_config = base_unet_config(Path(base))
    kind = base_kind(Path(base))
    patterns = [re.compile(p) for name in list(TARGETS)[: list(TARGETS).index(targets) + 1] for p in TARGETS[name]]
    base_index, tuned_index = module_index(Path(base), unet_config), module_index(Path(tuned), unet_config)
    report, state = ExtractReport(Path(out), rank), {}
    for module in sorted(base_index):
        if module not in tuned_index or not any(p.search(module[1]) for p in patterns):
            continue
        if kind == "refiner" and module[0] != "unet":
            continue  # refiner LoRAs are UNet-only: its bigG has no key naming both ComfyUI and diffusers read
        before, after = _load(base_index[module]), _load(tuned_index[module])
        if before.shape != after.shape:
            raise ModelError(f"{module[0]}:{module[1]} is {tuple(before.shape)} in {base} but {tuple(after.shape)} "
                             f"in {tuned}: the checkpoints are not the same architecture")
        diff = after - before
        if not diff.any():
            report.skipped += 1
            continue
        up, down, energy = low_rank(diff, rank)
        name = kohya_name(module[0], module[1], unet_config)
        state[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        state[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        state[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))  # alpha = rank: the scale is 1
        report.energy[name] = energy
    _write(Path(out), state, rank, Path(base).name, kind)
    return report


def low_rank(diff: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up, down, kept energy) with up @ down ≈ diff; conv weights give (out, r, 1, 1) and (r, in, kh, kw)."""
    matrix = diff.flatten(1)  # (out, in·kh·kw)
    r = min(rank, *matrix.shape)
    if min(matrix.shape) > 4 * r:
        # Randomized SVD: much faster on big matrices; a fixed seed keeps the output reproducible.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(matrix, q=min(r + 8, min(matrix.shape)), niter=6)
        u, s, vh = u[:, :r], s[:r], v[:, :r].T
    else:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    total = matrix.square().sum()
    energy = float(s.square().sum() / total) if total > 0 else 1.0
    up, down = lora_factors(u, s, vh, tuple(diff.shape))
    return up, down, min(energy, 1.0)


def lora_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) from a truncated SVD u·diag(s)·vh of a weight of `shape` (conv: (out, r, 1, 1), (r, in, kh, kw))."""
    root = s.sqrt()  # split σ evenly: neither matrix gets the whole dynamic range (fp16-friendly)
    up, down = u * root, root[:, None] * vh
    if len(shape) == 4:
        up, down = up[:, :, None, None], down.reshape(len(s), *shape[1:])
    return up, down


def _load(loc: _Loc) -> torch.Tensor:
    with safe_open(str(loc.file), framework="pt") as fh:
        tensor = fh.get_tensor(loc.key).float()
    if loc.rows is not None:
        size = tensor.shape[0] // 3
        tensor = tensor[loc.rows * size:(loc.rows + 1) * size]
    return tensor


def module_index(model: Path, unet_config: dict) -> dict[tuple[str, str], _Loc]:
    """(component, module path) -> where its weight is, for a diffusers folder or an SGM single file.

    Module paths are those `finetune.adapters.read.read_lora` uses: diffusers UNet paths, and text
    encoder paths with one `text_model.` level.
    """
    index: dict[tuple[str, str], _Loc] = {}
    if model.is_dir():
        for component, folder in FOLDER_COMPONENTS.items():
            for file in sorted((model / folder).glob("*.safetensors")):
                for key, entry in read_header(file)[0].items():
                    if key.endswith(".weight") and len(entry["shape"]) in (2, 4):
                        path = key.removesuffix(".weight")
                        index[(component, te_path(path) if component != "unet" else path)] = _Loc(file, key)
        return index
    if model.suffix != ".safetensors":
        raise ModelError(f"{model}: extraction reads .safetensors single files or diffusers folders")
    return _single_file_index(model, unet_config)


def _single_file_index(model: Path, unet_config: dict) -> dict[tuple[str, str], _Loc]:
    from_sgm = {sgm: path for path, sgm in unet_module_map(unet_config).items()}
    index: dict[tuple[str, str], _Loc] = {}
    for key, entry in read_header(model)[0].items():
        if not key.endswith("weight"):
            continue
        if key.startswith(UNET_PREFIX) and key.removeprefix(UNET_PREFIX)[:-7] in from_sgm:
            index[("unet", from_sgm[key.removeprefix(UNET_PREFIX)[:-7]])] = _Loc(model, key)
        elif key.startswith(TE1_PREFIX) and len(entry["shape"]) == 2:
            index[("te1", key.removeprefix(TE1_PREFIX)[:-7])] = _Loc(model, key)
        elif m := OPENCLIP.match(key):
            layer, name = m.groups()
            prefix = f"text_model.encoder.layers.{layer}."
            if name == "attn.in_proj_weight":
                for third, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                    index[("te2", f"{prefix}self_attn.{proj}")] = _Loc(model, key, third)
            else:
                index[("te2", prefix + OPENCLIP_NAMES[name])] = _Loc(model, key)
    return index


def _write(out: Path, state: dict, rank: int, base_name: str, kind: str = "base") -> None:
    metadata = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"stable-diffusion-xl-v1-{kind}/lora",
        "modelspec.title": out.stem,
        "ss_base_model_version": f"sdxl_{kind}_v1-0",
        "ss_sd_model_name": base_name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_network_args": json.dumps({"extracted": True}),
        "ss_training_method": "extracted",
    }
    with atomic_file(out) as tmp:
        save_file(state, str(tmp), metadata=metadata)
