"""What every codec shares: the finite-values check, float32 input, per-thread zstd contexts,
and the one line for an optional package that is missing or broken."""

from __future__ import annotations

import importlib
import threading
from types import ModuleType

import numpy as np

from freezecache.errors import FreezecacheError

# Why: zstd contexts are not safe to share between threads, and building one per blob is slow.
_ZSTD_LOCAL = threading.local()


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


def optional(module: str, package: str, avoid: str) -> ModuleType:
    """Import an optional package, or one line that names it and the setting that avoids it.

    A package can be missing, or present but broken (zfpy's wheels built against numpy 1 fail
    to import under numpy 2 with an ImportError, not a ModuleNotFoundError)."""
    try:
        return importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 (any import failure of an optional package)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FreezecacheError(
            f"{package} is not usable here ({first}) — install it (pip install {package}) or "
            f"set {avoid}"
        ) from None


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
