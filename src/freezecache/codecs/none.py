"""``none``: raw float32 (exact) or float16 bytes. Not bounded by ``tolerance``: the float16
error is whatever fp16 rounding gives, and the cache records the measured maximum."""

from __future__ import annotations

import numpy as np

from freezecache.codecs.base import as_f32, check_finite
from freezecache.core.errors import FreezecacheError


class NoneCodec:
    """Raw float32 or float16 bytes; float16 error is fp16 rounding, not ``tolerance``."""

    name = "none"
    bounded = False

    def __init__(self, tolerance: float, dtype: str = "float32") -> None:
        if dtype not in ("float32", "float16"):
            raise FreezecacheError(
                f"codec none: dtype {dtype!r} is not supported — use float32 or float16"
            )
        self.tolerance = tolerance
        self.dtype = dtype

    @property
    def options(self) -> dict:
        """The storage dtype."""
        return {"dtype": self.dtype}

    def encode(self, x: np.ndarray) -> bytes:
        """Store raw bytes in ``dtype``."""
        x = as_f32(x)
        check_finite(x)
        if self.dtype == "float16" and np.abs(x).max(initial=0.0) > np.finfo(np.float16).max:
            raise FreezecacheError(
                "activations exceed the float16 range (65504) — use codec none with "
                "dtype float32, or zfp/quant"
            )
        return x.astype(self.dtype).tobytes()

    def decode(self, buf: bytes, shape: tuple[int, ...]) -> np.ndarray:
        """Read raw bytes back as float32 (a writable copy)."""
        return np.frombuffer(buf, dtype=self.dtype).astype(np.float32).reshape(shape)
