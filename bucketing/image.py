"""Decoding one image as training sees it: EXIF-rotated, RGB, alpha on a background, resized and cropped."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from bucketing.assign import resized_size
from bucketing.errors import ImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def to_rgb(image: Image.Image, alpha_color=(255, 255, 255)) -> Image.Image:
    """Any mode -> RGB: alpha composited on `alpha_color`, 16-bit scaled to 8, CMYK and palette converted."""
    if image.mode in SIXTEEN_BIT_MODES:
        # 16-bit greyscale: scale to 8 bits instead of clipping everything above 255 to white.
        # (Pillow's point() refuses the big-endian modes; numpy reads them all.) A 32-bit "I" image
        # whose values stay within 0..255 is 8-bit data in a wide mode: keep it as is.
        values = np.asarray(image, dtype=np.float64)
        scale = 1 if image.mode == "I" and values.max(initial=0) <= 255 else 257
        image = Image.fromarray(np.clip(values / scale + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        # A palette or colour-key transparency is alpha too: composite it rather than drop it.
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*alpha_color, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@contextmanager
def pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Let our own `max_pixels` check decide instead of Pillow's global decompression-bomb limit.

    Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that; a caller that checks the size
    itself (before decoding) silences the warning, and may allow more than Pillow's default.
    """
    saved = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None and saved is not None and max_pixels > saved:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def open_image(path: Path, alpha_color=(255, 255, 255), max_pixels: int | None = None) -> Image.Image:
    """Decode `path` fully: RGB, EXIF orientation applied, alpha composited on `alpha_color`.

    Raises:
        ImageError: the image has more than `max_pixels` pixels (checked from the header, before decoding).
        PIL.Image.DecompressionBombError: without `max_pixels`, over Pillow's own limit.
        OSError / PIL.UnidentifiedImageError: unreadable, truncated or not an image.
    """
    with pixel_limit(max_pixels) if max_pixels is not None else nullcontext():
        with Image.open(path) as image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise ImageError(f"{path}: {image.width}x{image.height} pixels is over the limit of {max_pixels} "
                                 "(dataset.max_pixels); shrink the image or raise the limit")
            image = ImageOps.exif_transpose(image)
            image.load()
            return to_rgb(image, alpha_color)


def load_bucket_image(path: Path, bucket_size: tuple[int, int], crop_top_left: tuple[int, int], flip: bool,
                      alpha_color=(255, 255, 255)) -> Image.Image:
    """The training view of an image: resized to cover the bucket (Lanczos), flipped if asked, then cropped.

    The crop offsets are those recorded in the manifest, i.e. in the flipped image when `flip`.
    The result is exactly `bucket_size` (h, w).

    Raises:
        ImageError: the crop does not fit the resized image (the file changed since the manifest was built).
    """
    image = open_image(path, alpha_color)
    bh, bw = bucket_size
    rh, rw = resized_size((image.height, image.width), (bh, bw))
    top, left = crop_top_left
    if not (0 <= top <= rh - bh and 0 <= left <= rw - bw):
        raise ImageError(f"{path}: crop (top {top}, left {left}) of a {bh}x{bw} bucket does not fit the image "
                         f"resized to {rh}x{rw}; the file changed since the manifest was built: rebuild it "
                         "(finetune dataset build)")
    image = image.resize((rw, rh), Image.Resampling.LANCZOS)
    if flip:
        image = ImageOps.mirror(image)
    return image.crop((left, top, left + bw, top + bh))
