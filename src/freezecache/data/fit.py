"""Fit arrays of images to the model's input: pad or resize to a square size, convert channels
(data.resize: pad, the behaviour before data.resize; crop and letterbox:
freezecache.data.images)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from freezecache.core.errors import FreezecacheError

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, what PIL's convert("L") uses
_FIT_CHUNK = 1024  # images per interpolate call: bounds the float32 copy


def _to_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (N, C, H, W) -> (N, channels, H, W): 1->3 repeats, 3->1 takes BT.601 luminance."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return np.repeat(x, 3, axis=1)
    if c == 3 and channels == 1:
        luma = np.tensordot(
            np.asarray(LUMA, dtype=np.float32), x.astype(np.float32), axes=([0], [1])
        )
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[:, None]  # (N,H,W) -> (N,1,H,W)
    raise FreezecacheError(f"cannot convert {c}-channel images to {channels} — use channels 1 or 3")


def _resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear antialiased resize of uint8 (N, C, H, W), in chunks to bound float memory."""
    out = np.empty((len(x), x.shape[1], height, width), dtype=np.uint8)
    for start in range(0, len(x), _FIT_CHUNK):
        chunk = torch.from_numpy(x[start : start + _FIT_CHUNK]).float()
        resized = F.interpolate(
            chunk, size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )
        out[start : start + _FIT_CHUNK] = resized.round().clamp_(0, 255).to(torch.uint8).numpy()
    return out


def _pad_centre(x: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad uint8 (N, C, h, w) with h, w <= size to (N, C, size, size), image centred."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, size, size), dtype=np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[:, :, top : top + h, left : left + w] = x
    return out


def fit_images(images: np.ndarray, img_size: int, channels: int) -> np.ndarray:
    """Fit images to uint8 (N, channels, img_size, img_size).

    Pad (centre, zeros) when smaller, resize (bilinear, torch interpolate with antialias) when
    larger; 1->3 channels by repeat, 3->1 by luminance (0.299, 0.587, 0.114).

    A non-square image larger than img_size keeps its aspect ratio: its longer side is resized
    to img_size and the shorter side is then padded.
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise FreezecacheError(
            f"fit_images needs uint8 (N, C, H, W) images, got {images.dtype}{images.shape}"
        )
    if img_size < 1 or channels not in (1, 3):
        raise FreezecacheError(
            f"img_size {img_size} / channels {channels} are invalid — use img_size >= 1 and "
            "channels 1 or 3"
        )
    if images.shape[1] == 3 and channels == 1:
        images = _to_channels(images, 1)  # before resizing: 3x less to resize
    h, w = images.shape[2:]
    if max(h, w) > img_size:
        scale = img_size / max(h, w)
        images = _resize(images, max(1, round(h * scale)), max(1, round(w * scale)))
    if images.shape[2:] != (img_size, img_size):
        images = _pad_centre(images, img_size)
    return _to_channels(images, channels)  # 1->3 after resizing: 3x less to resize
