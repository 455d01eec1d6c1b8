"""What every codec shares: the finite-values check, float32 input, per-thread zstd contexts,
and (from :mod:`freezecache.core.errors`) the one line for an optional package that is missing or
broken."""

from __future__ import annotations

import threading

import numpy as np

from freezecache.core.errors import FreezecacheError, optional

# Why: zstd contexts are not safe to share between threads, and building one per blob is slow.
_ZSTD_LOCAL = threading.local()

__all__ = ["as_f32", "check_finite", "optional", "zstd_compressor", "zstd_decompressor"]


def check_finite(x: np.ndarray) -> None:
    """Raise a user-facing error when activations hold NaN or Inf."""
    if not np.isfinite(x).all():
        raise FreezecacheError(
            "activations contain NaN/Inf — the frozen prefix diverged; "
            "check the checkpoint at the freeze point or lower the learning rate"
        )


def as_f32(x: np.ndarray) -> np.ndarray:
    """C-contiguous float32 view or copy of ``x`` (zfpy and tobytes need it)."""
    return np.ascontiguousarray(x, dtype=np.float32)


def zstd_compressor(level: int):
    """Per-thread zstd compressor for ``level``."""
    import zstandard

    cache = _ZSTD_LOCAL.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


def zstd_decompressor():
    """Per-thread zstd decompressor."""
    if not hasattr(_ZSTD_LOCAL, "decompressor"):
        import zstandard

        _ZSTD_LOCAL.decompressor = zstandard.ZstdDecompressor()
    return _ZSTD_LOCAL.decompressor
