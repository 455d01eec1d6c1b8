"""Decoding as the ecosystem does: one file of each kind against the pixels it must give, and
the three ways of fitting an image to the model's input size."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from freezecache.data.images import Fit, decode_image, model_data_config


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _halves(left, right, size=(40, 20), mode="RGB") -> Image.Image:
    """An image whose left half is ``left`` and right half ``right``."""
    img = Image.new(mode, size, left)
    img.paste(Image.new(mode, (size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return img


def test_rgb_formats_decode_to_their_pixels():
    red, blue = (200, 30, 40), (20, 40, 220)
    kinds = (("PNG", {}, 0), ("BMP", {}, 0), ("TIFF", {}, 0), ("WEBP", {"lossless": True}, 0),
             ("JPEG", {"quality": 95}, 4))  # fmt: skip
    for fmt, kw, tol in kinds:
        got = decode_image(_bytes(_halves(red, blue), fmt, **kw), fmt, 3)
        assert got.shape == (3, 20, 40), fmt
        np.testing.assert_allclose(got[:, 10, 5], red, atol=tol, err_msg=fmt)
        np.testing.assert_allclose(got[:, 10, 35], blue, atol=tol, err_msg=fmt)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    # 12336 = 48 x 257 and 50629 = 197 x 257: convert("L") would clip both to 255
    grey = np.array([[12336, 50629, 0, 65535]], dtype=np.uint16)
    data = _bytes(Image.fromarray(grey), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    np.testing.assert_array_equal(decode_image(data, "16-bit", 1)[0, 0], [48, 197, 0, 255])
    np.testing.assert_array_equal(decode_image(data, "16-bit", 3)[:, 0, 1], [197] * 3)


def test_exif_orientation_is_applied():
    upright = _halves((0, 0, 0), (255, 255, 255), size=(40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    got = decode_image(_bytes(stored, "JPEG", quality=95, exif=exif), "exif", 3)
    assert got.shape == (3, 20, 40)  # landscape again
    assert got[:, 10, 3].max() < 20 and got[:, 10, 36].min() > 235


def test_alpha_is_composited_over_white():
    rgba = Image.new("RGBA", (4, 1), (200, 0, 0, 255))
    rgba.putpixel((1, 0), (200, 0, 0, 128))
    rgba.putpixel((2, 0), (13, 200, 9, 0))  # fully transparent: whatever colour it holds
    got = decode_image(_bytes(rgba, "PNG"), "rgba", 3)[:, 0]
    np.testing.assert_array_equal(got[:, 0], [200, 0, 0])
    np.testing.assert_allclose(got[:, 1], [228, 127, 127], atol=1)  # 128/255 red over white
    np.testing.assert_array_equal(got[:, 2], [255, 255, 255])
    la = Image.new("LA", (2, 1), (100, 255))
    la.putpixel((1, 0), (100, 0))
    np.testing.assert_array_equal(decode_image(_bytes(la, "PNG"), "la", 1)[0, 0], [100, 255])


def test_palette_with_transparency_and_cmyk():
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([10, 20, 30, 250, 0, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    got = decode_image(_bytes(pal, "GIF", transparency=0), "gif", 3)[:, 0]
    np.testing.assert_array_equal(got[:, 0], [255, 255, 255])  # the transparent index
    np.testing.assert_array_equal(got[:, 1], [250, 0, 0])
    np.testing.assert_array_equal(
        decode_image(_bytes(pal, "PNG"), "png", 3)[:, 0, 0], [10, 20, 30]
    )  # no transparency: the palette colour
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan or black: red
    got = decode_image(_bytes(cmyk, "JPEG", quality=95), "cmyk", 3)[:, 4, 4]
    np.testing.assert_allclose(got, [255, 0, 0], atol=4)


def test_crop_resizes_the_shorter_side_and_keeps_the_centre():
    # 300x200: 50-pixel red bands left and right of a blue 200x200 centre
    img = Image.new("RGB", (300, 200), (255, 0, 0))
    img.paste(Image.new("RGB", (200, 200), (0, 0, 255)), (50, 0))
    got = Fit(32, 3, "crop").image(img)
    assert got.shape == (3, 32, 32)
    np.testing.assert_array_equal(got[:, 1:-1, 1:-1].reshape(3, -1).T.mean(0).round(), [0, 0, 255])
    # a smaller image is enlarged, not padded
    small = Fit(32, 1, "crop").image(Image.new("L", (16, 16), 90))
    np.testing.assert_array_equal(small, np.full((1, 32, 32), 90))
    # crop_pct < 1 keeps the middle fraction of the shorter side, as timm's evaluation does
    quarters = _halves(0, 255, size=(64, 64), mode="L")
    assert Fit(32, 1, "crop", crop_pct=0.5).image(quarters).shape == (1, 32, 32)


def test_letterbox_keeps_the_whole_image_on_black_and_pad_is_the_old_fit():
    img = Image.new("RGB", (300, 200), (0, 200, 0))
    got = Fit(30, 3, "letterbox").image(img)  # 30 x 20 of image, 5 black rows above and below
    assert got[:, :5].max() == 0 and got[:, -5:].max() == 0
    np.testing.assert_array_equal(got[:, 15, 15], [0, 200, 0])
    padded = Fit(32, 1, "pad").image(Image.new("L", (16, 16), 90))  # centred, not enlarged
    assert padded[0, 8:24, 8:24].min() == 90 and padded[0, :8].max() == 0


def test_arrays_at_the_target_size_are_left_as_they_are():
    images = np.random.default_rng(0).integers(0, 256, (5, 1, 28, 28), dtype=np.uint8)
    for resize in ("crop", "letterbox", "pad"):
        np.testing.assert_array_equal(Fit(28, 1, resize).arrays(images), images)
    np.testing.assert_array_equal(Fit(28, 3, "crop").arrays(images), np.repeat(images, 3, 1))


def test_the_model_data_config_is_timms():
    assert model_data_config("resnet20") == (1.0, "bicubic")  # no timm config: whole side
    crop, interpolation = model_data_config("regnetx_002")
    assert (crop, interpolation) == (pytest.approx(0.875), "bicubic")
