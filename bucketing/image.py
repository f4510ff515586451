"""Decoding one image as training sees it: EXIF-rotated, RGB, alpha on a background, resized and cropped."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

from bucketing.assign import resized_size

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def to_rgb(image: Image.Image, alpha_color=(255, 255, 255)) -> Image.Image:
    """Any mode -> RGB: alpha composited on `alpha_color`, 16-bit scaled to 8, CMYK and palette converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of clipping everything above 255 to white.
        image = image.point(lambda v: v / 257).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*alpha_color, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(path: Path, alpha_color=(255, 255, 255), max_pixels: int | None = None) -> Image.Image:
    """Decode `path` fully: RGB, EXIF orientation applied. Raises ValueError over `max_pixels`."""
    with Image.open(path) as image:
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise ValueError(f"{path}: {image.width}x{image.height} is over the {max_pixels}-pixel limit")
        image = ImageOps.exif_transpose(image)
        image.load()
        return to_rgb(image, alpha_color)


def load_bucket_image(path: Path, bucket_size: tuple[int, int], crop_top_left: tuple[int, int], flip: bool,
                      alpha_color=(255, 255, 255)) -> Image.Image:
    """The training view of an image: resized to cover the bucket, flipped if asked, then cropped.

    The crop offsets are those recorded in the manifest, i.e. in the flipped image when `flip`.
    """
    image = open_image(path, alpha_color)
    rh, rw = resized_size((image.height, image.width), tuple(bucket_size))
    image = image.resize((rw, rh), Image.Resampling.LANCZOS)
    if flip:
        image = ImageOps.mirror(image)
    top, left = crop_top_left
    bh, bw = bucket_size
    return image.crop((left, top, left + bw, top + bh))
