"""Error-bounded codecs for chunks of float32 activations: the names users choose from.

A chunk is an array ``(k, *sample_shape)`` of ``k`` consecutive samples. Every codec turns a
chunk into one ``bytes`` blob and back; the caller keeps the shape (the cache records it).

- ``quant`` (:mod:`.quant`): uniform quantisation per chunk and channel with a proved bound,
  then a lossless stage: zstd on byte planes (``coding: zstd``) or context-modelled rANS
  (``coding: rans``, :mod:`.rans`, needs numba). Decoding the codes runs on the CPU; ``q * step
  + lo`` can run on the training device (:func:`.planes.dequantize`).
- ``zfp`` (:mod:`.zfp`): ZFP fixed-accuracy mode (needs zfpy).
- ``none`` (:mod:`.none`): raw float32 (exact) or float16 bytes.

zfp and absolute quant guarantee ``max|x - decode(encode(x))| <= tolerance``; relative quant
guarantees ``tolerance * scale_c`` per channel c.

This module holds only the names (declared in :mod:`freezecache.core.choices`, where params
validation reads them without importing this package) and the interface; :mod:`.registry`
builds codecs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from freezecache.core.choices import CODECS, CODINGS

if TYPE_CHECKING:
    import numpy as np

__all__ = ["CODECS", "CODINGS", "Codec"]


class Codec(Protocol):
    """Turns a float32 chunk ``(k, *sample_shape)`` into bytes and back."""

    name: str
    tolerance: float
    bounded: bool  # True when max abs error <= tolerance is guaranteed

    @property
    def options(self) -> dict:
        """Keyword options that rebuild this codec through :func:`.registry.make_codec`."""
        ...

    def encode(self, x: np.ndarray) -> bytes:
        """Compress a float32 chunk of any shape ``(k, *sample_shape)``."""
        ...

    def decode(self, buf: bytes, shape: tuple[int, ...]) -> np.ndarray:
        """Decompress a blob into a float32 array of ``shape``."""
        ...
