"""The manifest: one row per (image, flip variant) with caption, sizes, bucket and crop; the single source of truth."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bucketing.assign import assign
from bucketing.buckets import Bucket, derived_sides, make_buckets
from bucketing.checks import plan_warnings, upscaled_rows
from bucketing.errors import DatasetError
from bucketing.export import export_hf_dataset
from bucketing.report import DatasetReport
from bucketing.scan import ImageRecord, ValidationCache, scan_folder
from captions.scores import read_aesthetic_scores
from captions.sources import folder_repeats, read_metadata_jsonl, resolve_caption, unused_metadata_lines

# datasets is imported where a manifest is read or written: importing it takes a second.

__all__ = ["BuildOptions", "BuildResult", "DatasetError", "SubsetSpec", "build_manifest", "load_manifest",
           "save_manifest"]


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
    kohya_repeats: bool = False  # images under a "<N>_<caption>" folder are repeated N times instead
    is_regularization: bool = False
    recursive: bool = True
    resolution: int | list[int] | None = None  # own pixel budget(s); None: BuildOptions'; a list: a row per budget
    min_side: int | None = None  # None: the options' (own resolution: half of it)
    max_side: int | None = None  # None: the options' (own resolution: twice it)
    max_aspect: float | None = None  # None: the options'
    loss_weight: float | None = None  # written to each row; None: the trainer's default for the subset


@dataclass
class BuildOptions:
    resolution: int = 1024
    bucket_step: int = 64
    min_side: int | None = None  # None: half of resolution (derived_sides)
    max_side: int | None = None  # None: twice resolution
    max_aspect: float = 4.0
    min_original_side: int = 0
    max_pixels: int = 178_956_970
    crop: str = "center"
    flip: bool = False
    alpha_color: tuple[int, int, int] = (255, 255, 255)  # applied when images are loaded (load_bucket_image)
    seed: int = 0  # random crops: one rng per image, seeded by (seed, fingerprint)
    aesthetic_score: float = 6.0  # the refiner's score of images without one in metadata.jsonl


@dataclass
class BuildResult:
    dataset: object  # datasets.Dataset
    buckets: tuple[Bucket, ...]  # every planned bucket, all budgets together
    report: DatasetReport = field(default_factory=DatasetReport)
    plans: dict[int, tuple[Bucket, ...]] = field(default_factory=dict)  # budget -> its planned buckets


def build_manifest(subsets: list[SubsetSpec], options: BuildOptions, work_dir: Path) -> BuildResult:
    """Scan every subset, caption and bucket each usable image; rows in a stable order.

    Nothing is written into the subsets' folders; `work_dir` receives the validation cache
    (`validation.json`) and the PNGs exported from `hf_dataset` subsets.

    Raises:
        DatasetError: a subset's folder or dataset cannot be read, or no usable image in any subset.
    """
    import datasets

    work_dir = Path(work_dir)
    cache = ValidationCache(work_dir / "validation.json")
    rows, report, plans = [], DatasetReport(), {}
    for subset in subsets:
        subset_plans = subset_buckets(subset, options)
        for resolution, buckets in subset_plans:
            plans[resolution] = tuple(sorted(set(plans.get(resolution, ())) | set(buckets),
                                             key=lambda b: (b.aspect, b.height)))
        rows.extend(_subset_rows(subset, options, subset_plans, work_dir, cache, report))
    cache.save(prune=True)  # entries of files gone from every subset would only grow the file
    if not rows:
        raise DatasetError(_nothing_usable(subsets, report))
    report.totals = _totals(rows, report)
    report.warnings = plan_warnings(rows)
    report.upscaled = upscaled_rows(rows)
    every = tuple(sorted({b for buckets in plans.values() for b in buckets}, key=lambda b: (b.aspect, b.height)))
    return BuildResult(datasets.Dataset.from_list(rows), every, report, dict(sorted(plans.items())))


def subset_buckets(subset: SubsetSpec, options: BuildOptions) -> list[tuple[int, tuple[Bucket, ...]]]:
    """(budget, buckets) for each of the subset's budgets. A subset with its own resolution gets sides
    derived from it unless it sets them; otherwise the options' sides apply.

    Raises:
        DatasetError: no bucket fits (names the subset and the keys to change).
    """
    own = subset.resolution is not None
    budgets = (list(subset.resolution) if isinstance(subset.resolution, (list, tuple)) else [subset.resolution]) \
        if own else [options.resolution]
    plans = []
    for budget in budgets:
        low, high = derived_sides(budget, options.bucket_step) if own else (options.min_side, options.max_side)
        try:
            plans.append((budget, make_buckets(budget, options.bucket_step, subset.min_side or low,
                                               subset.max_side or high, subset.max_aspect or options.max_aspect)))
        except ValueError as err:
            raise DatasetError(f"subset {subset.name or subset.folder or subset.hf_dataset}: {err}") from None
    return plans


def _subset_rows(subset: SubsetSpec, options: BuildOptions, plans: list[tuple[int, tuple[Bucket, ...]]],
                 work_dir: Path, cache: ValidationCache, report: DatasetReport) -> list[dict]:
    """The rows of one subset; its problems and notes go to `report` with paths under the subset's root."""
    root, metadata, export_problems = _subset_root(subset, work_dir, options.max_pixels)
    report.problems.extend(export_problems)
    scan = scan_folder(root, recursive=subset.recursive, max_pixels=options.max_pixels,
                       min_original_side=options.min_original_side, validation_cache=cache)
    report.problems.extend((_full(root, path), reason) for path, reason in scan.problems)
    report.notes.extend((_full(root, path), note) for path, note in scan.notes)
    # A caption line that names no kept image is a mistake the user should see (a typo, a moved file).
    report.problems.extend(unused_metadata_lines(root, {r.rel_path for r in scan.records},
                                                 {path for path, _ in scan.problems}))
    name = subset.name or Path(subset.folder or subset.hf_dataset).name
    scores = read_aesthetic_scores(root)
    rows = []
    for record in scan.records:
        caption = _caption(record, root, subset, metadata, report)
        score = scores.get(Path(record.rel_path).as_posix(), options.aesthetic_score)
        for resolution, buckets in plans:
            rows.extend({**row, "aesthetic_score": score}
                        for row in _rows(record, root, caption, name, subset, buckets, options, resolution))
    return rows


def _full(root: Path, rel: str) -> str:
    """A report path the user can open: the subset's folder joined with the path inside it."""
    return str(root / rel) if not Path(rel).is_absolute() else rel


def _caption(record: ImageRecord, root: Path, subset: SubsetSpec, metadata: dict[str, str],
             report: DatasetReport) -> str:
    caption = resolve_caption(record.path, root, caption_ext=subset.caption_ext, metadata=metadata,
                              instance_prompt=subset.instance_prompt, class_prompt=subset.class_prompt,
                              is_regularization=subset.is_regularization, caption_prefix=subset.caption_prefix)
    where = _full(root, record.rel_path)
    if caption.note:
        report.notes.append((where, caption.note))
    if caption.source == "folder":
        report.notes.append((where, f"no caption ({record.path.with_suffix(subset.caption_ext).name}, "
                                    f"metadata.jsonl or instance_prompt): the folder name gives {caption.text!r}"))
    elif caption.source == "empty":
        report.notes.append((where, "no caption text: trained with the empty caption"))
    return caption.text


def _nothing_usable(subsets: list[SubsetSpec], report: DatasetReport) -> str:
    folders = ", ".join(str(s.folder or s.hf_dataset) for s in subsets)
    if not report.problems:
        return (f"{folders}: no usable image found (no JPEG, PNG, WebP, BMP or TIFF file); add images "
                "or point dataset.subsets.folder at the folder that holds them")
    shown = "; ".join(f"{Path(p).name}: {reason}" for p, reason in report.problems[:3])
    more = f" and {len(report.problems) - 3} more" if len(report.problems) > 3 else ""
    return (f"{folders}: no usable image found, {len(report.problems)} file(s) skipped ({shown}{more}); "
            "fix or replace them (`finetune dataset inspect CONFIG` lists every reason)")


def _totals(rows: list[dict], report: DatasetReport) -> dict[str, int]:
    plain = [r for r in rows if not r["flip"]]  # one per image, whether or not flips are on
    upscaled = sum(1 for r in plain if _upscaled(r["original_size"], r["bucket"]))
    subsets = Counter(r["subset"] for r in plain)
    per_epoch = sum(r["repeats"] for r in rows)  # what one epoch trains on, repeats and flips included
    return {"rows": len(rows), "images": len(plain), "skipped": len(report.problems),
            "upscaled": upscaled, "buckets used": len({(r["resolution"], tuple(r["bucket"])) for r in rows}),
            **({"samples per epoch": per_epoch} if per_epoch != len(rows) else {}),
            **{f"subset {name}": count for name, count in subsets.items()}}


def _upscaled(original_size: list[int], bucket: list[int]) -> bool:
    """The resize that covers the bucket enlarges the image (small images are kept, not dropped)."""
    return bucket[0] > original_size[0] or bucket[1] > original_size[1]


def _rows(record: ImageRecord, root: Path, caption: str, subset_name: str, subset: SubsetSpec,
          buckets: tuple[Bucket, ...], options: BuildOptions, resolution: int) -> list[dict]:
    """One row per flip variant; a random crop is seeded by (seed, fingerprint[, budget]), so a rebuild agrees."""
    # The budget joins the seed only when it differs from the dataset's: single-budget plans keep their crops.
    tag = "" if resolution == options.resolution else f":{resolution}"
    rng = random.Random(f"{options.seed}:{record.fingerprint}{tag}")
    variants = (False, True) if options.flip else (False,)
    rows = []
    for flip in variants:
        a = assign(record.original_size, buckets, options.crop, flip, random.Random(rng.random()))
        rows.append({
            "path": record.rel_path, "root": str(root.resolve()), "caption": caption,
            "original_size": list(record.original_size), "bucket": [a.bucket.height, a.bucket.width],
            "crop_top_left": [a.crop_top, a.crop_left], "flip": flip, "subset": subset_name,
            "repeats": _repeats(record, root, subset), "is_regularization": subset.is_regularization,
            "fingerprint": record.fingerprint, "mask_path": record.mask_path,
            "resolution": resolution, "loss_weight": subset.loss_weight,
        })
    return rows


def _repeats(record: ImageRecord, root: Path, subset: SubsetSpec) -> int:
    """The subset's repeats, or with kohya_repeats the N of the image's "<N>_<caption>" folder."""
    found = folder_repeats(record.path, root) if subset.kohya_repeats else None
    return subset.repeats if found is None else found


def _subset_root(subset: SubsetSpec, work_dir: Path, max_pixels: int
                 ) -> tuple[Path, dict[str, str], list[tuple[str, str]]]:
    """(folder to scan, captions by relative path, export problems). A `datasets` dataset is exported
    as PNGs into work_dir, in a folder named after its path so two subsets never share one."""
    if (subset.folder is None) == (subset.hf_dataset is None):
        raise DatasetError(f"subset {subset.name or '(unnamed)'}: give exactly one of folder or hf_dataset")
    if subset.folder is not None:
        folder = Path(subset.folder)
        if not folder.is_dir():
            raise DatasetError(f"{folder}: image folder not found; check dataset.subsets.folder")
        return folder, read_metadata_jsonl(folder), []
    source = Path(subset.hf_dataset)
    tag = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:8]
    out = work_dir / "hf" / f"{subset.name or source.name}-{tag}"
    captions, problems = export_hf_dataset(source, out, subset.image_column, subset.caption_column, max_pixels)
    return out, captions, problems

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
