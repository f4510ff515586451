"""The [dataset] table and its [[dataset.subsets]]: which images, how they are bucketed, captioned and mixed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from bucketing.buckets import derived_sides
from finetune.config.base import Section, _resolve


class SubsetConfig(Section):
    folder: Path | None = Field(None, description="Folder of images (searched recursively).")
    hf_dataset: Path | None = Field(None, description="A `datasets` dataset saved with save_to_disk, instead of a folder.")
    image_column: str = Field("image", description="Image column of hf_dataset.")
    caption_column: str = Field("text", description="Caption column of hf_dataset.")
    name: str | None = Field(None, description="Subset name in the manifest (default: folder name).")
    caption_ext: str = Field(".txt", description="Sidecar caption extension: .txt or .caption.")
    caption_prefix: str = Field("", description="Text put before every caption of this subset.")
    instance_prompt: str | None = Field(None, description="Caption for images without one (DreamBooth instance prompt).")
    class_prompt: str | None = Field(None, description="Caption for regularization images (DreamBooth class prompt).")
    repeats: int = Field(1, ge=1, description="How many times each image is seen per epoch.")
    kohya_repeats: bool = Field(False, description="kohya's folder layout: images under a sub-folder named "
                                "'<N>_<caption>' (e.g. '10_sks dog') are seen N times per epoch instead.")
    is_regularization: bool = Field(False, description="Prior-preservation images, weighted by loss.prior_loss_weight.")
    recursive: bool = Field(True, description="Look into sub-folders.")
    # Mixing: each key below left unset means "as the [dataset] table says" (or its plain default).
    resolution: int | list[int] | None = Field(None, description="This subset's pixel budget(s) (default: "
                                               "dataset.resolution). A list, e.g. [512, 1024], trains each image "
                                               "at every budget, as separate samples.")
    min_side: int | None = Field(None, ge=64, description="Smallest bucket side (default: dataset.min_side; with "
                                 "its own resolution, half of it).")
    max_side: int | None = Field(None, ge=64, description="Largest bucket side (default: dataset.max_side; with "
                                 "its own resolution, twice it).")
    max_aspect: float | None = Field(None, ge=1.0, description="Widest bucket aspect ratio (default: dataset.max_aspect).")
    loss_weight: float | None = Field(None, ge=0, description="Multiplies this subset's per-image loss (default 1.0; "
                                      "regularization subsets: loss.prior_loss_weight).")
    probability: float | None = Field(None, gt=0, description="Share of each epoch drawn from this subset, relative "
                                      "to the other subsets' (set it on every subset or none): an epoch keeps its "
                                      "length (images × repeats of all subsets), split by these weights.")
    batch_size: int | None = Field(None, ge=1, description="Images per batch for this subset's buckets (default: "
                                   "training.batch_size); e.g. larger for a 512² subset than for a 1024² one.")

    _paths = field_validator("folder", "hf_dataset")(_resolve)

    @field_validator("resolution")
    @classmethod
    def _resolutions(cls, value: int | list[int] | None) -> int | list[int] | None:
        values = value if isinstance(value, list) else [] if value is None else [value]
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError(f"give one or more different budgets, e.g. [512, 1024], got {value}")
        if any(v < 64 for v in values):
            raise ValueError(f"each budget must be at least 64, got {value}")
        return value

    @property
    def resolutions(self) -> list[int] | None:
        """The subset's own budgets, or None for the dataset's."""
        if self.resolution is None:
            return None
        return list(self.resolution) if isinstance(self.resolution, list) else [self.resolution]

    @property
    def subset_name(self) -> str:
        """Its name in the manifest: `name`, else the folder's name."""
        return self.name or Path(self.folder or self.hf_dataset).name

    @model_validator(mode="after")
    def _one_source(self) -> SubsetConfig:
        if (self.folder is None) == (self.hf_dataset is None):
            raise ValueError("folder: give exactly one of folder or hf_dataset")
        for key in ("folder", "hf_dataset"):
            path = getattr(self, key)
            if path is not None and not path.is_dir():
                raise ValueError(f"{key}: folder does not exist: {path}")
        if self.caption_ext not in (".txt", ".caption"):
            raise ValueError(f"caption_ext: must be .txt or .caption, got {self.caption_ext!r}")
        return self


class DatasetConfig(Section):
    resolution: int = Field(1024, ge=64, description="Pixel budget per image: about resolution² pixels (SDXL: 1024).")
    bucket_step: int = Field(64, ge=8, description="Bucket sides are multiples of this (64 keeps latents divisible by 8).")
    min_side: int | None = Field(None, ge=64, description="Smallest bucket side in pixels (default: half of "
                                 "resolution on the bucket_step grid, 512 at 1024; the resolved config records it).")
    max_side: int | None = Field(None, ge=64, description="Largest bucket side in pixels (default: twice "
                                 "resolution, 2048 at 1024; the resolved config records it).")
    max_aspect: float = Field(4.0, ge=1.0, description="Widest aspect ratio of a bucket (SDXL paper: 512x2048 .. 2048x512).")
    min_original_side: int = Field(0, ge=0, description="Drop images whose shorter side is below this (0 keeps all; small ones are upscaled).")
    max_pixels: int = Field(178_956_970, ge=1, description="Refuse images above this many pixels (decompression bombs).")
    crop: Literal["center", "random"] = Field("center", description="Crop of the resized image to its bucket.")
    aesthetic_score: float = Field(6.0, ge=0, le=10, description="Refiner: score of images without one in metadata.jsonl.")
    flip: bool = Field(False, description="Also train on horizontally flipped images (micro-conditioning mirrors the crop).")
    alpha_color: tuple[int, int, int] = Field((255, 255, 255), description="Background for transparent images.")
    remainder: Literal["drop", "carry"] = Field("carry", description="A bucket's last partial batch: drop it, or keep it as a smaller batch.")
    shuffle_tags: bool = Field(False, description="Shuffle comma-separated tags every step (needs cache.text = false).")
    keep_tokens: int = Field(0, ge=0, description="With shuffle_tags, the first N tags stay in place.")
    tag_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Drop each tag with this probability per step (needs cache.text = false).")
    caption_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Train on the empty caption with this probability (for CFG).")
    long_captions: Literal["truncate", "chunk"] = Field("truncate", description="Captions over 75 tokens: truncate (with a warning) or encode in 75-token chunks as A1111/kohya do.")
    weighted_captions: bool = Field(False, description="Read A1111 emphasis in captions: (word) x1.1, [word] "
                                    "/1.1, (word:1.3); each token's embedding scaled, the mean restored (kohya's "
                                    "weighted_captions). Off: brackets are plain text.")
    num_workers: int = Field(0, ge=0, description="Data loader worker processes.")
    subsets: list[SubsetConfig] = Field(min_length=1, description="[[dataset.subsets]] tables: folders of images.")

    @model_validator(mode="before")
    @classmethod
    def _derived_sides(cls, data: Any) -> Any:
        # Unset sides follow the budget (half and twice it), so the resolved config records real values.
        if isinstance(data, dict) and (data.get("min_side") is None or data.get("max_side") is None):
            resolution, step = data.get("resolution", 1024), data.get("bucket_step", 64)
            if isinstance(resolution, int) and isinstance(step, int) and resolution > 0 and step > 0:
                low, high = derived_sides(resolution, step)
                data = {**data, "min_side": data.get("min_side") or low, "max_side": data.get("max_side") or high}
        return data

    @property
    def largest_resolution(self) -> int:
        """The largest pixel budget any subset trains at (the memory peak's image size is its square)."""
        return max([self.resolution] + [r for s in self.subsets for r in s.resolutions or []])

    @model_validator(mode="after")
    def _sides(self) -> DatasetConfig:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side: {self.min_side} is larger than max_side {self.max_side}")
        if self.resolution % self.bucket_step:
            raise ValueError(f"resolution: must be a multiple of bucket_step ({self.bucket_step}), got {self.resolution}")
        for i, subset in enumerate(self.subsets):
            for budget in subset.resolutions or []:
                if budget % self.bucket_step:
                    raise ValueError(f"subsets.{i}.resolution: {budget} must be a multiple of bucket_step "
                                     f"({self.bucket_step})")
        names = [s.subset_name for s in self.subsets]
        twins = sorted({n for n in names if names.count(n) > 1})
        if twins and any(s.probability is not None or s.batch_size is not None for s in self.subsets):
            # probability and batch_size are looked up by the manifest's subset name.
            raise ValueError(f"subsets: two subsets are named {twins[0]!r}; give each a distinct `name = \"...\"`")
        chosen = [s.probability is not None for s in self.subsets]
        if any(chosen) and not all(chosen):
            unset = ", ".join(repr(n) for n, c in zip(names, chosen) if not c)
            raise ValueError(f"subsets.probability: set it on every subset or on none (missing on {unset})")
        return self
