"""Decoding: EXIF orientation, mode conversions, the pixel limit, and the training crop of one image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bucketing.assign import resized_size
from bucketing.errors import ImageError
from bucketing.image import load_bucket_image, open_image
from conftest import make_image

# Where the stored top-left corner ends up once each EXIF orientation is applied (TIFF/EXIF spec).
CORNER = {1: "TL", 2: "TR", 3: "BR", 4: "BL", 5: "TL", 6: "TR", 7: "BR", 8: "BL"}


def dark_corner(image: Image.Image) -> str:
    a = np.asarray(image.convert("L"), dtype=np.float32)
    h, w = a.shape
    quarters = {"TL": a[: h // 2, : w // 2], "TR": a[: h // 2, w // 2:], "BL": a[h // 2:, : w // 2],
                "BR": a[h // 2:, w // 2:]}
    return min(quarters, key=lambda k: quarters[k].mean())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, oriented, orientation):
    path = oriented(tmp_path / "o.jpg", (40, 80), orientation)
    image = open_image(path)
    assert image.mode == "RGB"
    assert (image.height, image.width) == ((80, 40) if orientation >= 5 else (40, 80))
    assert dark_corner(image) == CORNER[orientation]


def test_modes_become_rgb(tmp_path):
    deep = np.arange(64 * 96, dtype=np.uint16).reshape(64, 96) * 10  # up to 61,430 of 65,535
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert open_image(tmp_path / "deep.png").getpixel((95, 63)) == (239, 239, 239)  # 61430/257: scaled, not clipped
    Image.new("RGBA", (6, 6), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert open_image(tmp_path / "clear.png", alpha_color=(0, 0, 255)).getpixel((1, 1)) == (0, 0, 255)
    Image.new("RGBA", (6, 6), (255, 0, 0, 255)).save(tmp_path / "opaque.png")
    assert open_image(tmp_path / "opaque.png", alpha_color=(0, 0, 255)).getpixel((1, 1)) == (255, 0, 0)
    Image.new("LA", (6, 6), (100, 128)).save(tmp_path / "la.png")
    assert open_image(tmp_path / "la.png", alpha_color=(0, 0, 0)).getpixel((1, 1)) == (50, 50, 50)
    palette = Image.new("P", (6, 6), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(tmp_path / "p.png", transparency=0)
    assert open_image(tmp_path / "p.png").getpixel((1, 1)) == (10, 200, 30)
    palette.save(tmp_path / "p_clear.png", transparency=1)  # the only colour used is the transparent one
    assert open_image(tmp_path / "p_clear.png", alpha_color=(7, 8, 9)).getpixel((1, 1)) == (7, 8, 9)
    Image.new("CMYK", (6, 6), (0, 255, 255, 0)).save(tmp_path / "cmyk.tif")
    assert open_image(tmp_path / "cmyk.tif").getpixel((1, 1)) == (255, 0, 0)


def test_pixel_limit_is_ours_not_pillows(tmp_path, monkeypatch):
    path = make_image(tmp_path / "a.png", 100, 100)
    with pytest.raises(ImageError, match="over the limit of 9999"):
        open_image(path, max_pixels=9999)
    # Pillow refuses above 2 x MAX_IMAGE_PIXELS; a caller's larger max_pixels lets the image through
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombError):
        open_image(path)
    assert open_image(path, max_pixels=10_000).size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored


def independent_view(path, bucket, crop, flip):
    """Resize with Pillow's Lanczos to the covering size, mirror with numpy, slice with numpy."""
    image = Image.open(path).convert("RGB")
    rh, rw = resized_size((image.height, image.width), bucket)
    array = np.asarray(image.resize((rw, rh), Image.Resampling.LANCZOS))
    if flip:
        array = array[:, ::-1]
    (top, left), (bh, bw) = crop, bucket
    return array[top:top + bh, left:left + bw]


@pytest.mark.parametrize("flip", [False, True])
def test_bucket_view_is_the_recorded_crop(tmp_path, flip):
    path = make_image(tmp_path / "w.png", 100, 230)
    for crop in [(0, 0), (0, 37), (0, 83)]:  # resized to 64x147: left offsets 0..83
        view = load_bucket_image(path, (64, 64), crop, flip)
        assert (view.height, view.width) == (64, 64)
        assert np.array_equal(np.asarray(view), independent_view(path, (64, 64), crop, flip))
    # the mirrored offset of the flipped image shows the mirror of the plain crop
    plain = np.asarray(load_bucket_image(path, (64, 64), (0, 10), False))
    mirrored = np.asarray(load_bucket_image(path, (64, 64), (0, 147 - 64 - 10), True))
    assert np.array_equal(mirrored, plain[:, ::-1])


def test_a_crop_off_the_image_is_refused(tmp_path):
    path = make_image(tmp_path / "w.png", 100, 230)
    with pytest.raises(ImageError, match="rebuild"):
        load_bucket_image(path, (64, 64), (0, 84), False)


@pytest.mark.parametrize("mode,value,grey", [("I;16", 60000, 233), ("I;16B", 60000, 233), ("I;16L", 514, 2),
                                             ("I", 60000, 233), ("I", 200, 200), ("F", 0.0, 0), ("1", 1, 255)])
def test_wide_and_odd_modes(mode, value, grey):
    from bucketing.image import to_rgb

    assert to_rgb(Image.new(mode, (3, 2), value)).getpixel((2, 1)) == (grey, grey, grey)
