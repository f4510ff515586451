"""Resizing a LoRA to a lower rank: the best rank-r approximation (SVD) of each module's change.

A rank-64 LoRA often keeps most of its effect at rank 16 in a quarter of the file. Each module's
change ΔW is truncated to its top singular values; `energy` instead keeps, per module, the
smallest rank whose singular values hold that share of ΔW's squared Frobenius norm (kohya's
`sv_fro`). LoHa and LoKr modules come out as plain LoRA; DoRA keeps its magnitude vector. The
result is written with kohya keys and alpha = rank (the factors carry the scale).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from finetune.adapters.convert import kohya_tensors, module_kohya_tensors
from finetune.adapters.modules import AdapterModule, LoraModule
from finetune.adapters.read import read_lora
from finetune.errors import ConfigError, ModelError
from finetune.io import atomic_file, check_output
from finetune.models.configs import sdxl_unet_config
from finetune.tools.extract import lora_factors


@dataclass
class ResizeReport:
    out: Path
    ranks: dict[str, tuple[int, int]] = field(default_factory=dict)  # module -> (rank before, rank after)
    energy: dict[str, float] = field(default_factory=dict)  # module -> kept share of ‖ΔW‖²

    def __str__(self) -> str:
        before = sorted({r for r, _ in self.ranks.values()})
        after = [r for _, r in self.ranks.values()]
        kept = min(self.energy.values(), default=1.0)
        return (f"written {self.out}: {len(self.ranks)} modules, rank {before} -> {min(after)}..{max(after)}; "
                f"kept energy: mean {sum(self.energy.values()) / max(len(self.energy), 1):.4f}, lowest {kept:.4f}")


def resize_lora(src: Path, dst: Path, rank: int, *, energy: float | None = None,
                unet_config: dict | None = None, overwrite: bool = False) -> ResizeReport:
    """Write `src` at rank `rank` (at most; lower per module with `energy`) to `dst`, kohya keys.

    Raises:
        ConfigError: rank < 1, energy outside (0, 1], `dst` is `src`, or `dst` exists without `overwrite`.
        ModelError: `src` is unreadable, has keys no module matches, or a damaged module (NaN or
            infinite values, rank 0, up and down that do not fit).
    """
    if rank < 1:
        raise ConfigError(f"--rank {rank}: must be at least 1")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"--energy {energy}: a share of the change to keep, in (0, 1], e.g. 0.95")
    check_output(Path(dst), overwrite=overwrite, inputs=[Path(src)])
    lora = read_lora(Path(src), unet_config=unet_config)
    if not lora.modules:
        raise ModelError(f"{src}: holds no adapter modules to resize")
    report, resized = ResizeReport(Path(dst)), {}
    for (component, path), module in lora.modules.items():
        name = f"{component}:{path}"
        resized[(component, path)], report.energy[name] = resize_module(module, rank, energy)
        report.ranks[name] = (module.rank or min(module.out_shape[:2]), resized[(component, path)].rank)
    # A diffusers file's peft config describes its own keys, not the kohya ones written here.
    metadata = {k: v for k, v in lora.metadata.items() if k != "lora_adapter_metadata"}
    metadata.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(r for _, r in report.ranks.values())),
        "ss_network_alpha": str(max(r for _, r in report.ranks.values())),
        "ss_network_args": json.dumps({"variant": "dora" if any(
            m.dora_scale is not None for m in resized.values()) else "lora"}),
        "resized": json.dumps({"rank": rank, "energy": energy, "from": Path(src).name}),
        "format": "pt",
    })
    # The source's precision (an fp16 file stays fp16); the SVD itself runs in fp32.
    dtype = next(t.dtype for k, t in module_kohya_tensors(next(iter(lora.modules.values()))).items() if k != "alpha")
    tensors = {k: v if k.endswith(".alpha") else v.to(dtype)
               for k, v in kohya_tensors(resized, unet_config or lora.unet_config or sdxl_unet_config()).items()}
    with atomic_file(Path(dst)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return report


def resize_module(module: AdapterModule, rank: int, energy: float | None = None) -> tuple[LoraModule, float]:
    """(a LoRA module of rank ≤ `rank` closest to `module`'s change, the kept share of ‖ΔW‖²)."""
    if isinstance(module, LoraModule):
        u, s, vh = _factored_svd(module)
    else:
        matrix = module.delta().flatten(1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    total = s.square().sum()
    keep = min(rank, len(s))
    if energy is not None and total > 0:
        cumulative = s.square().cumsum(0) / total
        keep = min(keep, int((cumulative < energy - 1e-7).sum()) + 1)
    kept = float(s[:keep].square().sum() / total) if total > 0 else 1.0
    up, down = lora_factors(u[:, :keep], s[:keep], vh[:keep], tuple(module.out_shape))
    dora = module.dora_scale if isinstance(module, LoraModule) else None
    return LoraModule(down=down, up=up, alpha=float(keep), dora_scale=dora), min(kept, 1.0)


def _factored_svd(module: LoraModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of (alpha/rank)·up@down from its factors: two thin QRs and an r×r SVD, never the full matrix."""
    up = module.up.float().flatten(1) * (module.alpha / module.rank)  # (out, r)
    down = module.down.float().flatten(1)  # (r, in·kh·kw)
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    p, s, vh = torch.linalg.svd(r_up @ r_down.T)
    return q_up @ p, s, vh @ q_down.T
