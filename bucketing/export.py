"""Turning a `datasets` dataset saved on disk into a folder of PNGs in our work dir, once per image."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from PIL import Image, ImageOps

from bucketing.errors import DatasetError
from bucketing.image import pixel_limit

# datasets is imported where a manifest is read or written: importing it takes a second.

# Modes PNG stores as they are; anything else (CMYK, YCbCr, float) is converted to RGB on export.
PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")


def export_hf_dataset(source: Path, out: Path, image_column: str, caption_column: str,
                      max_pixels: int) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Write each row's image to `out` as `<row>-<content hash>.png`; return ({file name: caption}, problems).

    Images are read as stored bytes (no decode) to name them, so a rebuild decodes only new or
    changed rows. Files in `out` that no longer match a row are removed (`out` is ours, never the
    user's). EXIF orientation is applied on export, since PNG files carry no orientation here.

    Raises:
        DatasetError: not a dataset saved with save_to_disk, or a missing / non-image column.
    """
    import datasets

    table = _load(source, image_column, caption_column)
    table = table.cast_column(image_column, datasets.Image(decode=False))
    out.mkdir(parents=True, exist_ok=True)
    captions: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    for index, row in enumerate(table):
        where = f"{source}[row {index}]"
        try:
            data = _image_bytes(row[image_column])
        except OSError as err:
            problems.append((where, f"image cannot be read ({err.strerror or err})"))
            continue
        if data is None:
            problems.append((where, f"no image in column {image_column!r}"))
            continue
        name = f"{index:06d}-{hashlib.sha256(data).hexdigest()[:12]}.png"
        problem = None if (out / name).is_file() else _write_png(data, out / name, max_pixels)
        if problem:
            problems.append((where, problem))
            continue
        text = row[caption_column]
        captions[name] = " ".join(text) if isinstance(text, list) else str(text if text is not None else "")
    for stale in set(os.listdir(out)) - set(captions):
        (out / stale).unlink()
    return captions, problems


def _load(source: Path, image_column: str, caption_column: str):
    import datasets

    try:
        table = datasets.load_from_disk(str(source))
    except (FileNotFoundError, ValueError) as err:
        raise DatasetError(f"{source}: not a dataset saved with save_to_disk ({err}); "
                           "check dataset.subsets.hf_dataset") from None
    if isinstance(table, datasets.DatasetDict):
        raise DatasetError(f"{source}: holds several splits ({', '.join(table)}); point hf_dataset at one "
                           "split's folder")
    for column in (image_column, caption_column):
        if column not in table.column_names:
            raise DatasetError(f"{source}: no column {column!r} (columns: {', '.join(table.column_names)}); "
                               "set dataset.subsets.image_column / caption_column")
    if not isinstance(table.features[image_column], datasets.Image):
        raise DatasetError(f"{source}: column {image_column!r} holds {table.features[image_column]}, not images; "
                           "set dataset.subsets.image_column to the image column")
    return table


def _image_bytes(item: dict | None) -> bytes | None:
    if not item:
        return None
    if item.get("bytes"):
        return item["bytes"]
    if item.get("path"):
        return Path(item["path"]).read_bytes()
    return None


def _write_png(data: bytes, target: Path, max_pixels: int) -> str | None:
    """Decode `data` and save it as a PNG at `target` (atomically); a problem text when it cannot be."""
    try:
        with pixel_limit(max_pixels), Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:
                return (f"{image.width}x{image.height} pixels is over the limit of {max_pixels} "
                        "(dataset.max_pixels): not exported")
            image = ImageOps.exif_transpose(image)
            if image.mode not in PNG_MODES:
                image = image.convert("RGB")
            tmp = target.with_name(f".{target.name}.tmp")  # no image extension: never scanned half-written
            image.save(tmp, format="PNG")
            os.replace(tmp, target)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"unreadable or truncated image ({err})"
    return None
