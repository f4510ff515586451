"""Thumbnails with the crop drawn on them: the crop's geometry in the original image, and the disk cache.

The manifest gives the crop in the resized image (and, for a flipped row, in the mirrored one);
the thumbnail shows the file as it is on disk, so the box is mapped back to original pixels.
Thumbnails live in a cache folder the caller names (a run's `cache/`), never beside the images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from bucketing.assign import resized_size
from bucketing.image import to_rgb
from finetune.io import atomic_file

THUMB_SIDE = 256  # longest side of a thumbnail, in pixels
SHADE = (0, 0, 0, 150)  # the part cut away: darkened, still recognisable
OUTLINE = (255, 210, 0, 255)


def crop_box(original_size: Sequence[int], bucket: Sequence[int], crop_top_left: Sequence[int],
             flip: bool = False) -> tuple[float, float, float, float]:
    """(top, left, bottom, right) of the trained region in the original image's pixels (h, w order in, as
    the manifest stores them). A flipped row's crop_left is in the mirrored image: mirror it back."""
    h, w = int(original_size[0]), int(original_size[1])
    bh, bw = int(bucket[0]), int(bucket[1])
    rh, rw = resized_size((h, w), (bh, bw))
    top, left = int(crop_top_left[0]), int(crop_top_left[1])
    if flip:
        left = rw - bw - left
    scale_h, scale_w = rh / h, rw / w  # per axis: the resize rounds each side on its own
    return (top / scale_h, left / scale_w, (top + bh) / scale_h, (left + bw) / scale_w)


def cropped_percent(original_size: Sequence[int], bucket: Sequence[int], crop_top_left: Sequence[int],
                    flip: bool = False) -> float:
    """How much of the original image the crop cuts away, in percent (0 for an exact fit)."""
    top, left, bottom, right = crop_box(original_size, bucket, crop_top_left, flip)
    kept = (bottom - top) * (right - left)
    return max(0.0, 100.0 * (1.0 - kept / (int(original_size[0]) * int(original_size[1]))))


def thumb_key(fingerprint: str, bucket: Sequence[int], crop_top_left: Sequence[int], flip: bool) -> str:
    """Cache file stem: changes when the image (its fingerprint) or its crop does."""
    text = f"{fingerprint}|{list(bucket)}|{list(crop_top_left)}|{flip}|{THUMB_SIDE}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def thumbnail(path: Path, row: dict, cache_dir: Path) -> Path:
    """The cached thumbnail of manifest `row` (its image at `path`), made on first use."""
    out = Path(cache_dir) / f"{thumb_key(row['fingerprint'], row['bucket'], row['crop_top_left'], row['flip'])}.png"
    if out.is_file():
        return out
    image = draw_crop(path, row)
    with atomic_file(out) as tmp:  # two tabs may ask for the same thumbnail: whole or absent
        image.save(tmp, format="PNG")
    return out


def draw_crop(path: Path, row: dict):
    """The image scaled to THUMB_SIDE with the cut-away part shaded and the crop outlined."""
    with Image.open(path) as source:
        # JPEG decodes at 1/2..1/8 scale when asked first: a 24-megapixel photo in milliseconds, not 0.3 s.
        source.draft("RGB", (THUMB_SIDE * 2, THUMB_SIDE * 2))
        image = to_rgb(ImageOps.exif_transpose(source))  # the orientation original_size describes
    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
    h, w = row["original_size"]
    sy, sx = image.height / h, image.width / w
    top, left, bottom, right = crop_box(row["original_size"], row["bucket"], row["crop_top_left"], row["flip"])
    box = (round(left * sx), round(top * sy), round(right * sx) - 1, round(bottom * sy) - 1)  # PIL: x0, y0, x1, y1
    shade = Image.new("RGBA", image.size, SHADE)
    ImageDraw.Draw(shade).rectangle(box, fill=(0, 0, 0, 0))  # the kept region stays clear
    out = Image.alpha_composite(image.convert("RGBA"), shade)
    ImageDraw.Draw(out).rectangle(box, outline=OUTLINE, width=2)
    return out.convert("RGB")
