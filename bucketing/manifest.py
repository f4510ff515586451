"""The manifest: one row per (image, flip variant) with caption, sizes, bucket and crop; the single source of truth."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bucketing.assign import assign
from bucketing.buckets import Bucket, make_buckets
from bucketing.report import DatasetReport
from bucketing.scan import scan_folder
from captions.sources import read_metadata_jsonl, resolve_caption


class DatasetError(ValueError):
    """The dataset cannot be used at all (no usable image, unreadable folder); names the path."""


@dataclass
class SubsetSpec:
    """One `[[dataset.subsets]]` table (same field names as finetune's SubsetConfig)."""

    folder: Path | None = None
    hf_dataset: Path | None = None
    image_column: str = "image"
    caption_column: str = "text"
    name: str | None = None
    caption_ext: str = ".txt"
    caption_prefix: str = ""
    instance_prompt: str | None = None
    class_prompt: str | None = None
    repeats: int = 1
    is_regularization: bool = False
    recursive: bool = True


@dataclass
class BuildOptions:
    resolution: int = 1024
    bucket_step: int = 64
    min_side: int = 512
    max_side: int = 2048
    max_aspect: float = 4.0
    min_original_side: int = 0
    max_pixels: int = 178_956_970
    crop: str = "center"
    flip: bool = False
    alpha_color: tuple[int, int, int] = (255, 255, 255)
    seed: int = 0


@dataclass
class BuildResult:
    dataset: object  # datasets.Dataset
    buckets: tuple[Bucket, ...]
    report: DatasetReport = field(default_factory=DatasetReport)


def build_manifest(subsets: list[SubsetSpec], options: BuildOptions, work_dir: Path) -> BuildResult:
    """Scan every subset, caption and bucket each usable image; rows in a stable order.

    Raises:
        DatasetError: no usable image in any subset.
    """
    import datasets

    buckets = make_buckets(options.resolution, options.bucket_step, options.min_side, options.max_side,
                           options.max_aspect)
    rows, report = [], DatasetReport()
    for subset in subsets:
        root, metadata = _subset_root(subset, Path(work_dir))
        scan = scan_folder(root, recursive=subset.recursive, max_pixels=options.max_pixels,
                           min_original_side=options.min_original_side,
                           validation_cache=Path(work_dir) / "validation.json")
        report.problems.extend(scan.problems)
        report.notes.extend(scan.notes)
        name = subset.name or root.name
        for record in scan.records:
            caption = resolve_caption(record.path, root, caption_ext=subset.caption_ext, metadata=metadata,
                                      instance_prompt=subset.instance_prompt, class_prompt=subset.class_prompt,
                                      is_regularization=subset.is_regularization,
                                      caption_prefix=subset.caption_prefix)
            if caption.note:
                report.notes.append((record.rel_path, caption.note))
            if caption.source == "empty":
                report.notes.append((record.rel_path, "no caption found: trained with the empty caption"))
            rows.extend(_rows(record, root, caption.text, name, subset, buckets, options))
    if not rows:
        folders = ", ".join(str(s.folder or s.hf_dataset) for s in subsets)
        raise DatasetError(f"{folders}: no usable image found ({len(report.problems)} skipped); add JPEG/PNG/WebP "
                           "images (run `finetune dataset inspect` for the reasons)")
    counts = Counter(r["subset"] for r in rows)
    report.totals = {"rows": len(rows), "images": len({(r["root"], r["path"]) for r in rows}),
                     "skipped": len(report.problems), **{f"subset {k}": v for k, v in counts.items()}}
    return BuildResult(datasets.Dataset.from_list(rows), buckets, report)


def _rows(record, root: Path, caption: str, subset_name: str, subset: SubsetSpec, buckets, options) -> list[dict]:
    rng = random.Random(f"{options.seed}:{record.fingerprint}")
    variants = (False, True) if options.flip else (False,)
    rows = []
    for flip in variants:
        a = assign(record.original_size, buckets, options.crop, flip, random.Random(rng.random()))
        rows.append({
            "path": record.rel_path, "root": str(root.resolve()), "caption": caption,
            "original_size": list(record.original_size), "bucket": [a.bucket.height, a.bucket.width],
            "crop_top_left": [a.crop_top, a.crop_left], "flip": flip, "subset": subset_name,
            "repeats": subset.repeats, "is_regularization": subset.is_regularization,
            "fingerprint": record.fingerprint, "mask_path": record.mask_path,
        })
    return rows


def _subset_root(subset: SubsetSpec, work_dir: Path) -> tuple[Path, dict[str, str]]:
    """(folder to scan, captions from metadata). A `datasets` dataset is exported as PNGs into work_dir."""
    if subset.folder is not None:
        folder = Path(subset.folder)
        if not folder.is_dir():
            raise DatasetError(f"{folder}: image folder not found; check dataset.subsets.folder")
        return folder, read_metadata_jsonl(folder)
    import datasets

    source = Path(subset.hf_dataset)
    try:
        table = datasets.load_from_disk(str(source))
    except (FileNotFoundError, ValueError) as err:
        raise DatasetError(f"{source}: not a dataset saved with save_to_disk ({err})") from None
    for column in (subset.image_column, subset.caption_column):
        if column not in table.column_names:
            raise DatasetError(f"{source}: no column {column!r} (columns: {', '.join(table.column_names)})")
    out = work_dir / "hf" / (subset.name or source.name)
    out.mkdir(parents=True, exist_ok=True)
    captions = {}
    for i, row in enumerate(table):
        name = f"{i:06d}.png"
        if not (out / name).exists():  # exported once; the fingerprint then stays stable
            row[subset.image_column].save(out / name)
        captions[name] = str(row[subset.caption_column] or "")
    return out, captions


def save_manifest(result: BuildResult, out_dir: Path) -> Path:
    """Write the manifest (`save_to_disk`) and `report.json` into `out_dir`, replacing it in one rename."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        result.dataset.save_to_disk(str(tmp / "data"))
        (tmp / "report.json").write_text(result.report.to_json(), encoding="utf-8")
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_manifest(out_dir: Path):
    """The manifest written by `save_manifest`, as a `datasets.Dataset`."""
    import datasets

    path = Path(out_dir) / "data"
    if not path.is_dir():
        raise DatasetError(f"{out_dir}: no manifest here; run `finetune dataset build CONFIG` first")
    return datasets.load_from_disk(str(path))
