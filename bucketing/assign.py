"""Where one image goes: its bucket, resize, crop and flip, and the micro-conditioning they imply."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from bucketing.buckets import Bucket, nearest_bucket


@dataclass(frozen=True)
class Assignment:
    bucket: Bucket
    resized_size: tuple[int, int]  # (h, w) after the resize that covers the bucket
    crop_top: int  # pixels cut from the resized image's top edge
    crop_left: int  # ... and left edge, in the image as the model sees it (mirrored when flipped)
    flip: bool

    @property
    def crop_top_left(self) -> tuple[int, int]:
        return (self.crop_top, self.crop_left)


def resized_size(original_size: tuple[int, int], bucket: Bucket | Sequence[int]) -> tuple[int, int]:
    """(h, w) after scaling by max(bucket_h / h, bucket_w / w); each side at least the bucket's."""
    h, w = original_size
    bh, bw = bucket.size if isinstance(bucket, Bucket) else tuple(bucket)
    # Float error can leave a side a hair under the bucket's; clamp so the crop never runs off the image.
    scale = max(bh / h, bw / w)
    return (max(bh, round(h * scale)), max(bw, round(w * scale)))


def assign(original_size: tuple[int, int], buckets: Sequence[Bucket], crop: str = "center", flip: bool = False,
           rng: random.Random | None = None) -> Assignment:
    """Bucket, resize and crop for an image of `original_size` (h, w, after EXIF transpose).

    The crop is centred, or uniform random with `rng` (required then). With `flip` the crop offsets
    are those of the mirrored image: crop_left' = resized_w - bucket_w - crop_left.
    """
    h, w = original_size
    bucket = nearest_bucket(h, w, buckets)
    rh, rw = resized_size(original_size, bucket)
    if crop == "center":
        top, left = (rh - bucket.height) // 2, (rw - bucket.width) // 2
    elif crop == "random":
        if rng is None:
            raise ValueError("random crops need an rng")
        top, left = rng.randint(0, rh - bucket.height), rng.randint(0, rw - bucket.width)
    else:
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    if flip:
        left = rw - bucket.width - left
    return Assignment(bucket, (rh, rw), top, left, flip)


def add_time_ids(original_size: Sequence[int], crop_top_left: Sequence[int], bucket_size: Sequence[int]) -> list[int]:
    """SDXL's micro-conditioning: [orig_h, orig_w, crop_top, crop_left, target_h, target_w]."""
    return [int(original_size[0]), int(original_size[1]), int(crop_top_left[0]), int(crop_top_left[1]),
            int(bucket_size[0]), int(bucket_size[1])]


def refiner_add_time_ids(original_size: Sequence[int], crop_top_left: Sequence[int],
                         aesthetic_score: float) -> list[float]:
    """The SDXL refiner's micro-conditioning: [orig_h, orig_w, crop_top, crop_left, aesthetic_score].

    As diffusers' StableDiffusionXLImg2ImgPipeline._get_add_time_ids (requires_aesthetics_score) and
    SGM's refiner conditioner order them; the refiner has no target size.
    """
    return [float(original_size[0]), float(original_size[1]), float(crop_top_left[0]), float(crop_top_left[1]),
            float(aesthetic_score)]
