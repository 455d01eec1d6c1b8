"""Tests for freezecache.data.fit: padding, resizing and channel conversion."""

from __future__ import annotations

import numpy as np
import pytest

from freezecache.core.errors import FreezecacheError
from freezecache.data import fit_images


def test_fit_images_pads_centred() -> None:
    images = np.random.default_rng(0).integers(1, 256, (3, 1, 28, 28), dtype=np.uint8)
    out = fit_images(images, 32, 1)
    assert out.shape == (3, 1, 32, 32) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :, 2:30, 2:30], images)
    border = out.sum() - out[:, :, 2:30, 2:30].sum()
    assert border == 0


def test_fit_images_resizes_down_with_aspect() -> None:
    flat = np.full((2, 3, 64, 64), 77, dtype=np.uint8)
    np.testing.assert_array_equal(fit_images(flat, 32, 3), np.full((2, 3, 32, 32), 77))
    stripes = np.zeros((1, 1, 64, 64), dtype=np.uint8)
    stripes[..., ::2] = 200  # antialiasing averages 1-pixel stripes to their mean
    inner = fit_images(stripes, 16, 1)[..., 1:-1]  # edge columns see a clamped border
    assert np.abs(inner.astype(int) - 100).max() <= 1
    wide = np.full((1, 1, 20, 80), 9, dtype=np.uint8)
    out = fit_images(wide, 40, 1)
    assert (out[0, 0, 15:25] == 9).all() and (out[0, 0, :15] == 0).all()


def test_fit_images_channels() -> None:
    grey = np.arange(16, dtype=np.uint8).reshape(1, 1, 4, 4)
    rgb = fit_images(grey, 4, 3)
    assert rgb.shape == (1, 3, 4, 4) and all((rgb[:, c] == grey[:, 0]).all() for c in range(3))
    colours = np.array([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30], dtype=np.uint8)
    pixels = colours.reshape(4, 3).T.reshape(1, 3, 2, 2)  # 4 pixels (R, G, B, mixed)
    luma = fit_images(pixels, 2, 1)
    np.testing.assert_array_equal(luma.ravel(), [76, 150, 29, 18])  # 0.299, 0.587, 0.114 of 255
    with pytest.raises(FreezecacheError, match="channels 1 or 3"):
        fit_images(grey, 4, 2)
