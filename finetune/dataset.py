"""From the `[dataset]` config to the manifest on disk: the glue between config and `bucketing`."""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bucketing.manifest import BuildOptions, SubsetSpec, build_manifest, load_manifest, save_manifest
from bucketing.report import bucket_counts, format_report
from captions.length import check_caption_lengths
from finetune.errors import DatasetError
from finetune.models.tokenizers import clip_token_counter
from finetune.plan import run_plan


@dataclass
class ManifestInfo:
    dataset: object  # datasets.Dataset, one row per (image, flip variant)
    report_text: str
    manifest_dir: Path

    @property
    def num_rows(self) -> int:
        return len(self.dataset)


def build_options(cfg, seed: int) -> BuildOptions:
    """The planning options of a `DatasetConfig`."""
    return BuildOptions(
        resolution=cfg.resolution,
        bucket_step=cfg.bucket_step,
        min_side=cfg.min_side,  # the config fills unset sides from the resolution
        max_side=cfg.max_side,
        max_aspect=cfg.max_aspect,
        min_original_side=cfg.min_original_side,
        max_pixels=cfg.max_pixels,
        crop=cfg.crop,
        flip=cfg.flip,
        alpha_color=tuple(cfg.alpha_color),
        seed=seed,
        aesthetic_score=cfg.aesthetic_score,
    )


def subset_specs(cfg) -> list[SubsetSpec]:
    """The planning part of each subset (probability and batch_size are the sampler's)."""
    return [SubsetSpec(**subset.model_dump(exclude={"probability", "batch_size"})) for subset in cfg.subsets]


def build_dataset(cfg, seed: int, manifest_dir: Path) -> ManifestInfo:
    """Scan, validate, plan and write the manifest (and its report) to `manifest_dir`.

    Raises:
        DatasetError: no usable image, or a folder that cannot be read (names the path).
    """
    try:
        result = build_manifest(subset_specs(cfg), build_options(cfg, seed), work_dir=manifest_dir.parent / "dataset-work")
    except ValueError as err:  # bucketing's own errors subclass ValueError; they name the path
        raise DatasetError(str(err)) from None
    save_manifest(result, manifest_dir)
    return ManifestInfo(load_manifest(manifest_dir), format_scan(result), manifest_dir)


def format_scan(result) -> str:
    # Images, not rows: a flipped twin is the same image. One table per budget when subsets mix them.
    if len(result.plans) > 1:
        text = format_report(result.report, result.plans,
                             {res: bucket_counts(result.dataset, res) for res in result.plans})
    else:
        text = format_report(result.report, result.buckets, bucket_counts(result.dataset))
    warning = long_caption_warning(list(result.dataset["caption"]))
    return f"{text}\nwarning: {warning}" if warning else text


def long_caption_warning(captions: list[str]) -> str | None:
    """One warning for captions over CLIP's 75 tokens (SDXL's tokenizers share CLIP's vocabulary)."""
    return check_caption_lengths(captions, clip_token_counter())


def dataset_hash(dataset) -> str:
    """Identity of the training data: which images (by fingerprint), captions and crops, in order."""
    digest = hashlib.sha256()
    for column in ("path", "fingerprint", "caption", "bucket", "crop_top_left", "flip", "repeats"):
        digest.update(json.dumps(list(dataset[column])).encode())
    return digest.hexdigest()[:16]


def scan_dataset(cfg, seed: int):
    """Validate every file and plan the buckets in memory (`bucketing.manifest.BuildResult`), writing nothing the
    user keeps: the scan's working files (validation cache, images extracted from a `datasets` table) go to a
    temporary folder that is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="finetune-inspect-") as work_dir:
        try:
            return build_manifest(subset_specs(cfg), build_options(cfg, seed), work_dir=Path(work_dir))
        except ValueError as err:
            raise DatasetError(str(err)) from None


def inspect_dataset(cfg, seed: int) -> str:
    """The bucket report of the `[dataset]` table `cfg`, as text; writes nothing."""
    return format_scan(scan_dataset(cfg, seed))


def inspect_run(cfg, num_processes: int = 1) -> str:
    """The bucket report, then the run's plan (batches, accumulation, steps, images never trained) for the
    whole config `cfg`, as `finetune train` prints it at its start; writes nothing."""
    result = scan_dataset(cfg.dataset, cfg.training.seed)
    plan = run_plan(result.dataset, cfg.dataset, cfg.training, cfg.validation.split, num_processes)
    return f"{format_scan(result)}\n{plan.text()}"
