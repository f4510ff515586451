"""Reading LoRA files made by kohya, diffusers/PEFT, OneTrainer or this toolkit into one form.

Canonical module names (the keys of `LoraFile.modules`): ("unet", diffusers UNet module path) and
("te1" | "te2", text-encoder path with exactly one `text_model.` level, e.g.
"text_model.encoder.layers.0.self_attn.q_proj"), whatever the file's own naming.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from finetune.adapters.keys import te_path, text_name_table, unet_name_table
from finetune.adapters.modules import AdapterModule, LohaModule, LokrModule, LoraModule
from finetune.errors import ModelError
from finetune.io import read_safetensors_header
from finetune.models.configs import sdxl_unet_config
from finetune.models.refiner import REFINER_ARCHITECTURE, sdxl_refiner_unet_config

__all__ = ["LoraFile", "LoraModule", "LohaModule", "LokrModule", "read_lora", "modules_from_tensors"]

KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_")
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
# Suffix in a file -> role in a module. Kohya/LyCORIS, then the diffusers/PEFT spellings.
ROLES = {
    "lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "dora_scale": "dora_scale",
    "lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
    # peft's DoRA magnitude: (out,) for linear layers, (1, out, 1, 1) for convs.
    "lora_magnitude_vector": "magnitude", "lora_magnitude_vector.weight": "magnitude",
    **{k: k for k in LOHA_KEYS + LOKR_KEYS},
}
PEFT_PREFIXES = {"unet.": "unet", "text_encoder.": "te1", "text_encoder_2.": "te2"}
PEFT_NAMES = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}
# diffusers' old attention-processor LoRAs: `attn1.processor.to_q_lora.down.weight`.
PROCESSOR_KEY = re.compile(r"(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


@dataclass
class LoraFile:
    # (component, canonical module path) -> module; see the module docstring.
    modules: dict[tuple[str, str], AdapterModule] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    unet_config: dict | None = None  # the UNet config its names were decoded with (SDXL base's or refiner's)


def read_lora(path: Path, unet_config: dict | None = None, te_layers: tuple[int, int] = (12, 32),
              text_configs: tuple[dict, dict] | None = None) -> LoraFile:
    """Parse any supported LoRA file. Keys that match no module raise ModelError listing them.

    Args:
        unet_config: the target UNet's config (default: SDXL base), to decode kohya's `_` names.
        te_layers: layer counts of the two text encoders (SDXL: 12 and 32).
        text_configs: the two text encoders' configs; when given, their `num_hidden_layers` win over te_layers.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelError(f"{path}: LoRA files are read as .safetensors only (convert pickled files yourself)")
    if not path.is_file():
        raise ModelError(f"{path}: LoRA file not found")
    read_safetensors_header(path)  # a damaged file is one line naming it, before safetensors opens it
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            metadata = dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise ModelError(f"{path}: not a readable .safetensors file ({exc})") from None
    if text_configs is not None:
        te_layers = tuple(int(c["num_hidden_layers"]) for c in text_configs)
    candidates = [unet_config] if unet_config is not None else default_unet_configs(metadata)
    for i, config in enumerate(candidates):
        try:
            modules = modules_from_tensors(tensors, metadata, config, te_layers, where=str(path))
        except ModelError:
            if i == len(candidates) - 1:
                raise
            continue
        check_modules(modules, str(path))
        return LoraFile(modules, metadata, config)
    raise AssertionError("unreachable")


def check_modules(modules: dict[tuple[str, str], AdapterModule], where: str) -> None:
    """ModelError naming the file and module when a module is damaged: NaN or infinite values, rank 0,
    or factors whose shapes do not fit together (what would fail deep in a merge or an SVD)."""
    for (component, path), module in modules.items():
        problem = _damage(module)
        if problem:
            raise ModelError(f"{where}: {component}:{path} {problem}; the file is damaged: export it again")


def _damage(module: AdapterModule) -> str | None:
    if isinstance(module, LoraModule):
        tensors = {"down": module.down, "up": module.up, "dora_scale": module.dora_scale}
        down, up = module.down, module.up
        if down.dim() not in (2, 4) or up.dim() != down.dim():
            return f"has down {tuple(down.shape)} and up {tuple(up.shape)}: not a linear or conv LoRA pair"
        pairs = [("up", "down", up.flatten(1), down)]
    elif isinstance(module, LohaModule):
        tensors = {k: getattr(module, k[5:]) for k in LOHA_KEYS}
        if any(t.dim() != 2 for t in tensors.values()):
            return "has LoHa factors that are not matrices"
        pairs = [(f"hada_{w}_a", f"hada_{w}_b", tensors[f"hada_{w}_a"], tensors[f"hada_{w}_b"]) for w in ("w1", "w2")]
        m1, m2 = (module.w1_a.shape[0], module.w1_b.shape[1]), (module.w2_a.shape[0], module.w2_b.shape[1])
        if m1 != m2:
            return f"has LoHa products of shapes {m1} and {m2}, which must be equal"
    else:
        tensors = dict(module.tensors)
        pairs = [(f"lokr_{w}_a", f"lokr_{w}_b", tensors[f"lokr_{w}_a"], tensors[f"lokr_{w}_b"])
                 for w in ("w1", "w2") if f"lokr_{w}_a" in tensors]
    for name_a, name_b, a, b in pairs:
        if a.dim() < 2 or b.dim() < 1 or a.shape[1] != b.shape[0]:
            return f"has {name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)}, whose ranks differ"
        if b.shape[0] == 0:
            return "has rank 0 (empty factors)"
    if not all(torch.isfinite(t).all() for t in tensors.values() if t is not None):
        return "holds NaN or infinite values"
    if not torch.isfinite(torch.tensor(float(module.alpha))):
        return f"has alpha {module.alpha}"
    return None


def default_unet_configs(metadata: dict[str, str]) -> list[dict]:
    """UNet configs to decode a LoRA with when the caller names none: the kind its metadata says first.

    A base LoRA's SGM names decode with the base's config; a refiner LoRA's (four levels, attention in
    the middle two) only with the refiner's, so a file without metadata is tried with both.
    """
    configs = [sdxl_unet_config(), sdxl_refiner_unet_config()]
    refiner = metadata.get("modelspec.architecture", "").startswith(REFINER_ARCHITECTURE)
    return configs[::-1] if refiner else configs


def modules_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                         unet_config: dict | None = None, te_layers: tuple[int, int] = (12, 32),
                         where: str = "LoRA") -> dict[tuple[str, str], AdapterModule]:
    """The modules of a LoRA state dict in any supported naming (see read_lora)."""
    unet_config = unet_config or sdxl_unet_config()
    known = _known_modules(unet_config, te_layers)
    # Words bundled with the LoRA (`bundle_emb.<token>.clip_l`) are embeddings, not modules.
    tensors = {k: v for k, v in tensors.items() if not k.startswith("bundle_emb.")}
    if any(k.startswith(KOHYA_PREFIXES) for k in tensors):
        grouped, unknown = _group_kohya(tensors, unet_config, te_layers)
    else:
        grouped, unknown = _group_peft(tensors, known)
    modules = {}
    alphas = _peft_alphas(metadata or {})
    for key, parts in grouped.items():
        module = _build(parts, alphas(key))
        if module is None:
            unknown.append(f"{key[0]}:{key[1]} ({', '.join(sorted(parts))})")
        else:
            modules[key] = module
    if unknown:
        shown = ", ".join(sorted(unknown)[:8])
        raise ModelError(f"{where}: {len(unknown)} key(s) match no SDXL module or are incomplete "
                         f"(is it an SDXL LoRA?): {shown}")
    if not modules:
        raise ModelError(f"{where}: no LoRA modules found")
    return modules


def _known_modules(unet_config: dict, te_layers) -> dict[str, set[str]]:
    return {"unet": set(unet_name_table(unet_config).values()),
            "te1": set(text_name_table("te1", te_layers[0]).values()),
            "te2": set(text_name_table("te2", te_layers[1]).values())}


def _group_kohya(tensors, unet_config, te_layers):
    """`lora_unet_<name>.<suffix>`: names are looked up in tables of the architecture's real modules."""
    names = {**unet_name_table(unet_config), **text_name_table("te1", te_layers[0]),
             **text_name_table("te2", te_layers[1])}
    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        role = ROLES.get(suffix)
        if name not in names or role is None or suffix.startswith(("lora_A", "lora_B", "lora.", "lora_linear")):
            unknown.append(key)
            continue
        component = "unet" if name.startswith("lora_unet_") else name[5:8]
        grouped.setdefault((component, names[name]), {})[role] = value
    return grouped, unknown


def _group_peft(tensors, known):
    """`unet.<module path>.lora_A.weight` and the other diffusers/PEFT spellings."""
    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in tensors.items():
        component, rest = _split_component(key)
        found = _split_role(rest) if component else None
        if found is None:
            unknown.append(key)
            continue
        module, role = found
        module = module if component == "unet" else te_path(module)
        if module not in known[component]:
            unknown.append(key)
            continue
        grouped.setdefault((component, module), {})[role] = value
    return grouped, unknown


def _split_component(key: str) -> tuple[str | None, str]:
    for prefix, component in sorted(PEFT_PREFIXES.items(), key=lambda p: -len(p[0])):
        if key.startswith(prefix):
            return component, key[len(prefix):]
    if key.startswith(("down_blocks.", "mid_block.", "up_blocks.")):  # a bare UNet state dict
        return "unet", key
    return None, key


def _split_role(rest: str) -> tuple[str, str] | None:
    match = PROCESSOR_KEY.match(rest)
    if match:
        projection = "to_out.0" if match[2] == "to_out" else match[2]
        return f"{match[1]}.{projection}", match[3]
    for suffix in sorted(ROLES, key=len, reverse=True):
        if rest.endswith("." + suffix):
            return rest[: -len(suffix) - 1], ROLES[suffix]
    return None


def _peft_alphas(metadata: dict[str, str]):
    """module -> alpha from diffusers' `lora_adapter_metadata` header (peft's lora_alpha + alpha_pattern)."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        config = {}

    def alpha(key: tuple[str, str]) -> float | None:
        component, module = key
        prefix = PEFT_NAMES[component]
        patterns = config.get(f"{prefix}.alpha_pattern") or {}
        # peft matches a pattern against the end of the module name: `(.*\.)?pattern$`.
        names = (module, module.removeprefix("text_model."))
        for pattern, value in patterns.items():
            if any(re.match(rf"(.*\.)?({pattern})$", n) for n in names):
                return float(value)
        value = config.get(f"{prefix}.lora_alpha", config.get(f"{prefix}.alpha"))
        return None if value is None else float(value)

    return alpha


def _build(parts: dict[str, torch.Tensor], config_alpha: float | None) -> AdapterModule | None:
    """One module from its tensors by role; None when they make no complete module."""
    alpha = float(parts["alpha"]) if "alpha" in parts else config_alpha
    roles = set(parts) - {"alpha"}
    if roles in ({"down", "up"}, {"down", "up", "dora_scale"}, {"down", "up", "magnitude"}):
        down, up = parts["down"], parts["up"]
        dora_scale = parts.get("dora_scale")
        if "magnitude" in parts:  # to LyCORIS' output-axis layout, (out, 1[, 1, 1])
            dora_scale = parts["magnitude"].reshape(up.shape[0], *[1] * (up.dim() - 1))
        return LoraModule(down, up, alpha if alpha is not None else float(down.shape[0]), dora_scale)
    if roles == set(LOHA_KEYS):
        rank = parts["hada_w1_b"].shape[0]
        return LohaModule(*(parts[k] for k in LOHA_KEYS), alpha if alpha is not None else float(rank))
    has_w1 = roles & {"lokr_w1"} or roles >= {"lokr_w1_a", "lokr_w1_b"}
    has_w2 = roles & {"lokr_w2"} or roles >= {"lokr_w2_a", "lokr_w2_b"}
    if roles <= set(LOKR_KEYS) and has_w1 and has_w2:
        module = LokrModule({k: parts[k] for k in roles}, 0.0)
        # No alpha: ComfyUI and LyCORIS apply no scale, i.e. alpha = rank.
        module.alpha = alpha if alpha is not None else float(module.rank or 1)
        return module
    return None
