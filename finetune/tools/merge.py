"""Merging LoRAs into a checkpoint in the checkpoint's own layout and dtype (single file or diffusers folder).

The base is streamed tensor by tensor: untouched tensors are copied as raw bytes (byte-identical,
never decoded), merged ones are computed in fp32 and cast back, so memory stays near one tensor
plus the LoRAs rather than a second copy of the model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from finetune.adapters.metadata_read import lora_kind
from finetune.adapters.read import read_lora
from finetune.errors import ModelError
from finetune.io import atomic_dir, atomic_file, check_output, read_json_object
from finetune.io import read_safetensors_header as read_header
from finetune.models.configs import sdxl_unet_config
from finetune.models.refiner import kind_of_folder, kind_of_keys, sdxl_refiner_unet_config
from finetune.models.sgm_keys import unet_module_map
from finetune.models.single_file import load_single_file_pipeline, save_single_file
from finetune.tools.merge_words import add_words_to_folder, bundled_words, words_beside_paths, write_words_beside

# diffusers is imported only to convert a merged folder to one file: importing it takes seconds.

OPENCLIP_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
OPENCLIP_RENAMES = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
FOLDER_COMPONENTS = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
COPY_CHUNK = 16 << 20  # bytes per read when copying an untouched tensor


@dataclass
class MergeReport:
    out: Path
    merged: dict[str, list[str]] = field(default_factory=dict)  # LoRA file -> "component:module" merged
    words: list[str] = field(default_factory=list)  # what became of the words the LoRAs bundle

    def __str__(self) -> str:
        lines = [f"merged into {self.out}:"]
        lines += [f"  {name}: {len(modules)} modules" for name, modules in self.merged.items()]
        return "\n".join(lines + self.words)


@dataclass
class _Add:
    lora: str  # file name, for error messages
    module: object  # finetune.adapters.read.LoraModule
    scale: float


@dataclass
class _Edit:
    """What to add to one stored tensor: whole, or one row block (a third of OpenCLIP's fused qkv)."""
    parts: list[tuple[slice | None, list[_Add]]] = field(default_factory=list)


def merge_loras(base: Path, loras: list[tuple[Path, float]], out: Path, *, dtype: torch.dtype | None = None,
                overwrite: bool = False) -> MergeReport:
    """Add every LoRA (at its scale) to `base` and write the result to `out` in base's layout.

    Args:
        base: a diffusers folder or a single-file SGM `.safetensors`.
        loras: (LoRA file, scale) pairs, any format `finetune.adapters.read.read_lora` reads.
        out: a `.safetensors` file, else a diffusers folder; an existing one is replaced whole (never
            merged into) only with `overwrite`.
        dtype: cast every floating tensor written to this dtype (default: keep each tensor's own).

    Raises:
        ConfigError: `out` exists without `overwrite`, or is (inside, or holds) the base or a LoRA.
        ModelError: base unreadable, a LoRA module matches no weight, a shape does not fit, or a
            merged tensor is not finite (nothing is written at `out` in any of these cases).
    """
    base, out = Path(base), Path(out)
    want_file = out.suffix.lower() == ".safetensors"
    check_output(out, overwrite=overwrite, inputs=[base, *(Path(path) for path, _ in loras)], folder=not want_file)
    if not base.exists():
        raise ModelError(f"{base}: base model not found")
    if base.is_file() and base.suffix != ".safetensors":
        raise ModelError(f"{base}: merging needs a .safetensors single file or a diffusers folder")
    unet_config = base_unet_config(base)
    kind = base_kind(base)
    wanted: dict[tuple[str, str], list[_Add]] = {}
    report = MergeReport(out)
    for path, scale in loras:
        check_lora_kind(Path(path), base, kind)
        lora = read_lora(Path(path), unet_config=unet_config)
        for key, module in lora.modules.items():
            wanted.setdefault(key, []).append(_Add(Path(path).name, module, float(scale)))
        report.merged[str(path)] = [f"{c}:{p}" for c, p in lora.modules]
    words = bundled_words([path for path, _ in loras])  # pivotal tuning's new words
    if want_file:  # their embedding files beside `out` are outputs too
        for path in words_beside_paths(out, words):
            check_output(path, overwrite=overwrite, inputs=[base, *(Path(p) for p, _ in loras)])
    if base.is_dir() == (not want_file):  # the base's own layout: stream only the tensors that change
        if base.is_dir():
            report.words = _merge_folder(base, out, wanted, dtype, words)
        else:
            _merge_single_file(base, out, wanted, unet_config, dtype)
            report.words = write_words_beside(out, words)
        return report
    # The other layout (a .safetensors out from a diffusers folder, or a folder out from a single file):
    # merge in the base's layout beside `out`, then convert that whole model once.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None) as work:
        merged = Path(work) / ("merged" if base.is_dir() else "merged.safetensors")
        (_merge_folder(base, merged, wanted, dtype) if base.is_dir()
         else _merge_single_file(base, merged, wanted, unet_config, dtype))
        report.words = _convert_layout(merged, out, dtype or _unet_dtype(merged), words, base)
    if words and want_file:
        report.words = write_words_beside(out, words)
    return report


def _unet_dtype(model: Path) -> torch.dtype:
    """The precision the model's UNet is stored in (an fp16 checkpoint stays fp16 when converted)."""
    file = model if model.is_file() else sorted((model / "unet").glob("*.safetensors"))[0]
    with safe_open(str(file), framework="pt") as fh:
        key = next(k for k in fh.keys() if model.is_dir() or k.startswith("model.diffusion_model."))
        return fh.get_tensor(key).dtype


def _convert_layout(merged: Path, out: Path, dtype: torch.dtype, words: dict, base: Path) -> list[str]:
    """A merged diffusers folder as one SGM single file, or a merged single file as a diffusers folder
    (with the bundled `words` added before it replaces `out`); the folder's word lines for the report."""
    if merged.is_dir():
        from diffusers import StableDiffusionXLPipeline

        try:
            pipe = StableDiffusionXLPipeline.from_pretrained(merged, local_files_only=True, use_safetensors=True,
                                                             torch_dtype=dtype)
        except (OSError, ValueError) as err:  # the configs copied from the base folder do not describe SDXL
            raise ModelError(f"{base}: diffusers could not load its merged copy ({err}); check the folder's "
                             "model_index.json and configs") from None
        save_single_file(pipe, out)
        return []
    pipe = load_single_file_pipeline(merged, dtype=dtype)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        return add_words_to_folder(tmp, words) if words else []


def base_unet_config(base: Path) -> dict:
    """The UNet config of a diffusers folder; SDXL base's or refiner's for a single file (its names decode the same)."""
    config = base / "unet" / "config.json"
    if base.is_dir() and config.is_file():
        return read_json_object(config)
    return sdxl_refiner_unet_config() if base_kind(base) == "refiner" else sdxl_unet_config()


def base_kind(base: Path) -> str:
    """"base" or "refiner": from a folder's configs, or a single file's text-encoder keys."""
    if base.is_dir():
        for config in (base / "model_index.json", *sorted(base.glob("*/config.json"))):
            if config.is_file():
                read_json_object(config)  # one line naming a broken config, not a traceback later
        if not (base / "unet" / "config.json").is_file():
            return "base"
        try:
            return kind_of_folder(base)
        except (KeyError, TypeError, ValueError) as err:
            raise ModelError(f"{base}: its unet or text_encoder_2 config.json lacks a value SDXL's have ({err}); "
                             "restore the configs from the model's source") from None
    return kind_of_keys(read_header(base)[0]) or "base"


def check_lora_kind(lora: Path, base: Path, kind: str) -> None:
    """One line when a LoRA's metadata says it was trained for the other SDXL model (base vs refiner)."""
    found = lora_kind(lora)
    if found is not None and found != kind:
        raise ModelError(f"{lora}: an SDXL {found} LoRA cannot merge into {base}, an SDXL {kind}; "
                         f"merge it into the {found}")


# --- safetensors streaming (headers read by finetune.io.read_safetensors_header) -----------------

def _target_shape(entry: dict, rows: slice | None) -> tuple[int, ...]:
    shape = tuple(entry["shape"])
    if rows is None:
        return shape
    return (rows.stop - rows.start, *shape[1:])


def _check_shape(key: str, entry: dict, rows: slice | None, adds: list[_Add]) -> None:
    target = _target_shape(entry, rows)
    for add in adds:
        shape = tuple(add.module.out_shape)
        numel = torch.Size(shape).numel()
        fits = shape == target or _squeezed(shape) == _squeezed(target)
        # LoHa/LoKr conv factors come flattened (out, in·kh·kw): same rows and size also fit.
        if not fits and not (shape[0] == target[0] and numel == torch.Size(target).numel()):
            raise ModelError(f"{add.lora}: {key} has shape {target} in the base but the LoRA's update is {shape} "
                             "(a LoRA for another architecture, e.g. SD1.5 on SDXL?)")


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    # A linear LoRA on a weight stored as a 1x1 conv (or the reverse) fits: trailing 1s don't matter.
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _merged_tensor(key: str, weight: torch.Tensor, edit: _Edit) -> torch.Tensor:
    """weight + Σ deltas, computed in fp32 and checked finite (the caller casts it back)."""
    merged = weight.float().clone()
    for rows, adds in edit.parts:
        target = merged[rows] if rows is not None else merged
        for add in adds:
            # Each adapter kind computes its own delta (DoRA needs the weight it rescales).
            target += add.module.delta(add.scale, weight=target).reshape(target.shape)
    if not torch.isfinite(merged).all():
        names = sorted({add.lora for _, adds in edit.parts for add in adds})
        raise ModelError(f"{', '.join(names)}: merging into {key} gives non-finite values (scale too large or a broken LoRA)")
    return merged


def stream_rewrite(src: Path, dst: Path, edits: dict[str, _Edit], dtype: torch.dtype | None = None,
                   metadata: dict[str, str] | None = None) -> None:
    """Write `src` to `dst` tensor by tensor, same order, keys and metadata; `edits` change some tensors.

    Untouched tensors are copied as raw bytes unless `dtype` asks for a cast.
    """
    header, src_metadata, data_start = read_header(src)
    metadata = src_metadata if metadata is None else metadata
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    out_code = SAFETENSORS_DTYPES[dtype] if dtype is not None else None
    new_header, offset = {}, 0
    for key in order:
        entry = header[key]
        code = out_code if (out_code and entry["dtype"] in FLOAT_CODES) else entry["dtype"]
        nbytes = _nbytes(entry, code)
        new_header[key] = {"dtype": code, "shape": entry["shape"], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps({"__metadata__": metadata, **new_header} if metadata else new_header, separators=(",", ":"))
    blob = blob.encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data start to 8 bytes
    with safe_open(str(src), framework="pt") as reader, open(src, "rb") as raw, open(dst, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        for key in order:
            entry = header[key]
            if key not in edits and new_header[key]["dtype"] == entry["dtype"]:
                begin, end = entry["data_offsets"]
                _copy_range(raw, fh, data_start + begin, end - begin)
                continue
            tensor = reader.get_tensor(key)
            if key in edits:
                tensor = _merged_tensor(key, tensor, edits[key]).to(dtype or tensor.dtype)
            else:
                tensor = tensor.to(dtype)
            fh.write(_tensor_bytes(tensor))


def _nbytes(entry: dict, code: str) -> int:
    sizes = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}
    count = 1
    for side in entry["shape"]:
        count *= side
    if code == entry["dtype"]:
        return entry["data_offsets"][1] - entry["data_offsets"][0]
    return count * sizes.get(code, 1)


def _copy_range(src, dst, start: int, length: int) -> None:
    src.seek(start)
    while length > 0:
        chunk = src.read(min(COPY_CHUNK, length))
        if not chunk:
            raise ModelError(f"{src.name}: file ends early (truncated .safetensors?)")
        dst.write(chunk)
        length -= len(chunk)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    # safetensors stores little-endian row-major data, which is the CPU's own layout here.
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# --- diffusers folder ----------------------------------------------------------------------------

def _folder_key(path: str, component: str, keys) -> str | None:
    candidates = [f"{path}.weight"]
    if component != "unet":  # transformers 5 writes CLIPTextModel without the text_model level
        candidates.append(f"{path.removeprefix('text_model.')}.weight")
    return next((k for k in candidates if k in keys), None)


def _plan_folder(base: Path, wanted: dict) -> dict[Path, dict[str, _Edit]]:
    """Relative weight file -> edits, checked against the headers before anything is written."""
    plan: dict[Path, dict[str, _Edit]] = {}
    pending = dict(wanted)
    for component, folder in FOLDER_COMPONENTS.items():
        paths = {p: adds for (c, p), adds in wanted.items() if c == component}
        if not paths:
            continue
        files = sorted((base / folder).glob("*.safetensors"))
        if not files:
            raise ModelError(f"{base / folder}: no .safetensors weights to merge into (convert .bin weights first)")
        for file in files:
            header, _, _ = read_header(file)
            for path, adds in paths.items():
                key = _folder_key(path, component, header)
                if key is None:
                    continue
                _check_shape(f"{folder}/{key}", header[key], None, adds)
                plan.setdefault(file.relative_to(base), {}).setdefault(key, _Edit()).parts.append((None, adds))
                pending.pop((component, path), None)
    _refuse_unmatched(base, pending)
    return plan


def _merge_folder(base: Path, out: Path, wanted: dict, dtype, words: dict | None = None) -> list[str]:
    plan = _plan_folder(base, wanted)
    if dtype is not None:  # a cast rewrites every weight file, edited or not
        for folder in (*FOLDER_COMPONENTS.values(), "vae"):
            for file in sorted((base / folder).glob("*.safetensors")):
                plan.setdefault(file.relative_to(base), {})
    rewritten = {base / rel for rel in plan}
    with atomic_dir(out) as tmp:
        # Untouched files are copied as they are; only the weight files with edits are rewritten.
        shutil.copytree(base, tmp, dirs_exist_ok=True, ignore=lambda d, names: [n for n in names if Path(d) / n in rewritten])
        for rel, edits in plan.items():
            stream_rewrite(base / rel, tmp / rel, edits, dtype)
        if not words:
            return []

        return add_words_to_folder(tmp, words)


# --- single file (SGM keys) ----------------------------------------------------------------------

def single_file_key(component: str, path: str, unet_config: dict) -> tuple[str, int | None]:
    """The SGM checkpoint key of one module's weight, and which third of OpenCLIP's fused qkv (or None)."""
    if component == "unet":
        sgm = unet_module_map(unet_config, [path]).get(path)
        return f"model.diffusion_model.{sgm or path}.weight", None
    if component == "te1":
        return f"conditioner.embedders.0.transformer.{path}.weight", None
    layer_path = path.removeprefix("text_model.encoder.layers.")
    layer, _, sub = layer_path.partition(".")
    prefix = f"conditioner.embedders.1.model.transformer.resblocks.{layer}"
    if sub in OPENCLIP_QKV:
        return f"{prefix}.attn.in_proj_weight", OPENCLIP_QKV[sub]
    return f"{prefix}.{OPENCLIP_RENAMES.get(sub, sub)}.weight", None


def _merge_single_file(base: Path, out: Path, wanted: dict, unet_config: dict, dtype) -> None:
    header, _, _ = read_header(base)
    edits: dict[str, _Edit] = {}
    pending = {}
    for (component, path), adds in wanted.items():
        key, third = single_file_key(component, path, unet_config)
        if key not in header:
            pending[(component, path)] = adds
            continue
        rows = None
        if third is not None:  # q, k, v are stacked thirds of OpenCLIP's in_proj_weight
            size = header[key]["shape"][0] // 3
            rows = slice(third * size, (third + 1) * size)
        _check_shape(key, header[key], rows, adds)
        edits.setdefault(key, _Edit()).parts.append((rows, adds))
    _refuse_unmatched(base, pending)
    with atomic_file(out) as tmp:
        stream_rewrite(base, tmp, edits, dtype)


def _refuse_unmatched(base: Path, pending: dict) -> None:
    if pending:
        shown = ", ".join(f"{c}:{p}" for c, p in sorted(pending)[:8])
        loras = sorted({add.lora for adds in pending.values() for add in adds})
        raise ModelError(f"{', '.join(loras)}: {len(pending)} LoRA module(s) match no weight in {base} "
                         f"(nothing was written; is the LoRA for this model?): {shown}")
