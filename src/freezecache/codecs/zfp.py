"""``zfp``: ZFP fixed-accuracy mode (zfpy, an optional package).

zfp works on blocks of 4^d values, so a chunk of one sample is compressed as its own
``(C, H, W)`` / ``(N, D)`` array; padding a sample axis of length 1 to 4 would waste 3/4 of
every block. ``k > 1`` compresses the paper's ``(k, C, H, W)`` / ``(k, N, D)`` array.
"""

from __future__ import annotations

import numpy as np

from freezecache.codecs.base import as_f32, check_finite, optional
from freezecache.core.errors import FreezecacheError


def _zfpy():
    return optional("zfpy", "zfpy", "cache.codec: quant")


class ZfpCodec:
    """ZFP fixed-accuracy; k == 1 chunks are compressed per sample (see module docstring)."""

    name = "zfp"
    bounded = True

    def __init__(self, tolerance: float) -> None:
        self.tolerance = tolerance

    @property
    def options(self) -> dict:
        """No options: zfp's only parameter is the tolerance."""
        return {}

    def encode(self, x: np.ndarray) -> bytes:
        """Compress ``x`` (k, *sample_shape); drops the sample axis when k == 1."""
        x = as_f32(x)
        check_finite(x)
        if x.shape[0] == 1:
            x = x[0]  # (1, C, H, W) -> (C, H, W): no 4x padding along the sample axis
        if not 1 <= x.ndim <= 4:
            raise FreezecacheError(
                f"zfp compresses 1-4 dimensional chunks, got shape {x.shape} — "
                "use chunk_size 1 or the quant codec for this activation shape"
            )
        return _zfpy().compress_numpy(x, tolerance=self.tolerance)

    def decode(self, buf: bytes, shape: tuple[int, ...]) -> np.ndarray:
        """Decompress into float32 of ``shape``."""
        return _zfpy().decompress_numpy(buf).reshape(shape)
