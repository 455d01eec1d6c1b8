"""One image file to the model's input, as the ecosystem does it: Pillow decodes, timm resizes.

Decoding (:func:`open_image`, :func:`to_mode`): Pillow opens the file, ``ImageOps.exif_transpose``
applies its EXIF orientation (a phone photo taken sideways trains upright), then its mode becomes
``L`` or ``RGB``:

- 16-bit and 32-bit integer grey (``I;16*``, ``I``) is scaled by 1/257 (0..65535 -> 0..255,
  rounded; a wider ``I`` range is clipped), not clipped at 255 as ``convert("L")`` does;
  float grey (``F``) in [0, 1] is scaled by 255;
- palette images are expanded with their transparency; CMYK, YCbCr, LAB and HSV are converted by
  Pillow (no colour management);
- transparency (``RGBA``, ``LA``, ``PA``, a palette's or a colour key's) is composited over
  white (:data:`ALPHA_BACKGROUND`), as a viewer shows a cut-out on a page; dropping alpha would
  show whatever colour the transparent pixels happen to hold.

Fitting (:class:`Fit`, ``data.resize``): ``crop`` is timm's evaluation transform
(``timm.data.create_transform(is_training=False)``: the shorter side resized to
``img_size / crop_pct``, then a centre crop of ``img_size``), what a timm model's own data config
asks for; ``letterbox`` keeps the whole image (``ImageOps.pad``: the longer side resized to
``img_size``, centred on black); ``pad`` is the earlier behaviour for datasets published at a
fixed small size (centred on black without scaling when smaller, letterboxed when larger).
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import Literal

import numpy as np

from freezecache.core.errors import FreezecacheError

ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_WIDE_GRAY = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
RESIZES = ("crop", "letterbox", "pad")
Resize = Literal["crop", "letterbox", "pad"]


def open_image(data: bytes, where: str):
    """A Pillow image of a file's bytes, upright (EXIF orientation applied) and fully loaded."""
    from PIL import Image, ImageOps

    try:
        img = Image.open(io.BytesIO(data))
        upright = ImageOps.exif_transpose(img)
        upright.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise FreezecacheError(
            f"{where} is not a readable image ({exc}) — remove or replace it"
        ) from exc
    return upright


def to_mode(img, channels: int):
    """``img`` as mode ``L`` (channels 1) or ``RGB`` (channels 3); see the module docstring."""
    from PIL import Image

    mode = img.mode
    if mode in _WIDE_GRAY:
        img = img.convert("I").point(lambda v: v / 257 + 0.5).convert("L")  # 65535 -> 255
    elif mode == "F":
        hi = img.getextrema()[1]
        img = (img.point(lambda v: v * 255 + 0.5) if hi <= 1.0 else img).convert("L")
    elif img.has_transparency_data:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (*ALPHA_BACKGROUND, 255)), rgba)
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def decode_image(data: bytes, where: str, channels: int) -> np.ndarray:
    """An image file decoded at its own size to uint8 (C, H, W), C = channels (1 or 3)."""
    return _chw(to_mode(open_image(data, where), channels))


def _chw(img) -> np.ndarray:
    """A Pillow image in mode L or RGB as uint8 (C, H, W)."""
    arr = np.asarray(img)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (H,W,C) -> (C,H,W)


@dataclass(frozen=True)
class Fit:
    """How every image becomes uint8 (channels, img_size, img_size): ``data.resize`` with the
    crop fraction and interpolation of the model's data config (timm's names)."""

    img_size: int
    channels: int
    resize: Resize = "crop"
    crop_pct: float = 1.0
    interpolation: str = "bicubic"

    def image(self, img) -> np.ndarray:
        """A decoded Pillow image (any mode) fitted: uint8 (channels, img_size, img_size)."""
        from PIL import Image, ImageOps

        img = to_mode(img, self.channels)
        size = self.img_size
        if self.resize == "crop":
            return _timm_eval(self.channels, size, self.crop_pct, self.interpolation)(img).numpy()
        if self.resize == "letterbox":
            method = Image.Resampling[self.interpolation.upper()]
            return _chw(ImageOps.pad(img, (size, size), method=method, color=0))
        from freezecache.data.fit import fit_images

        return fit_images(np.array(_chw(img))[None], size, self.channels)[0]

    def arrays(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, C, H, W) images of one size fitted: (N, channels, img_size, img_size)."""
        from PIL import Image

        from freezecache.data.fit import _to_channels, fit_images

        size = self.img_size
        if self.resize == "pad":
            return fit_images(images, size, self.channels)
        if images.shape[2:] == (size, size) and (self.resize == "letterbox" or self.crop_pct == 1):
            return _to_channels(images, self.channels)  # what either transform would give
        out = np.empty((len(images), self.channels, size, size), dtype=np.uint8)
        for i, im in enumerate(images):
            out[i] = self.image(
                Image.fromarray(im[0] if im.shape[0] == 1 else im.transpose(1, 2, 0))
            )
        return out


def model_data_config(model_name: str) -> tuple[float, str]:
    """(crop_pct, interpolation) of a model's own data config, what ``data.resize: crop`` uses
    when ``data.crop_pct`` is null: the timm pretrained config of that architecture through
    timm's ``resolve_data_config``; a model timm has no config for (freezecache's CIFAR ResNets)
    keeps the whole shorter side (1.0) with timm's default interpolation (bicubic)."""
    import timm
    from timm.data import resolve_data_config

    cfg = timm.models.get_pretrained_cfg(model_name.removeprefix("timm:"))
    if cfg is None:
        return 1.0, "bicubic"
    resolved = resolve_data_config(pretrained_cfg=cfg.to_dict())
    return float(resolved["crop_pct"]), str(resolved["interpolation"])


@functools.cache
def _timm_eval(channels: int, size: int, crop_pct: float, interpolation: str):
    """timm's evaluation transform to uint8 (C, H, W) tensors (no normalisation: the prepared
    data is uint8 and the training normalises with the training set's own statistics)."""
    from timm.data import create_transform

    return create_transform(
        input_size=(channels, size, size),
        is_training=False,
        use_prefetcher=True,  # stops at a uint8 tensor (timm's prefetcher would normalise)
        interpolation=interpolation,
        crop_pct=crop_pct,
        crop_mode="center",
    )
