"""Building codecs by name (:data:`freezecache.codecs.CODECS`), and calibrating the ones that
fix parameters from their first data."""

from __future__ import annotations

import numpy as np

from freezecache.codecs import CODECS, Codec
from freezecache.codecs.none import NoneCodec
from freezecache.codecs.quant import QuantCodec
from freezecache.codecs.zfp import ZfpCodec
from freezecache.core.errors import FreezecacheError

_CODECS = {cls.name: cls for cls in (QuantCodec, ZfpCodec, NoneCodec)}
assert tuple(_CODECS) == CODECS, "every name in codecs.CODECS has one implementation"


def make_codec(name: str, tolerance: float, **opts) -> Codec:
    """Build the codec ``name`` ("zfp" | "quant" | "none") with its options."""
    if name not in _CODECS:
        raise FreezecacheError(f"unknown codec {name!r} — use one of {', '.join(sorted(_CODECS))}")
    if _CODECS[name].bounded and not tolerance > 0:
        raise FreezecacheError(
            f"codec {name}: tolerance must be > 0, got {tolerance} — set a positive tolerance"
        )
    try:
        return _CODECS[name](tolerance, **opts)
    except TypeError as err:
        raise FreezecacheError(
            f"codec {name}: unsupported options {sorted(opts)} ({err}) — remove the unknown keys"
        ) from None


def needs_calibration(codec: Codec) -> bool:
    """Whether ``codec`` fixes parameters from the first data it encodes (a relative quant's
    channel scales, rANS tables): a build must then :func:`calibrate` it up front."""
    return isinstance(codec, QuantCodec) and (codec.relative or codec.coding == "rans")


def calibrate(codec: Codec, first: np.ndarray, chunk_size: int) -> None:
    """Calibrate ``codec`` on samples ``first`` (n, *sample_shape), cut into chunks of
    ``chunk_size``: a codec left to itself calibrates on whatever it encodes first (a writer's
    space estimate: one chunk), which for a resumed build is the chunk it resumes at. Calibrated
    up front on the data set's first samples, an interrupted, resumed or shared build encodes
    every chunk alike; the parameters are then in ``codec.options`` (and the spool's identity)."""
    if not needs_calibration(codec):
        return
    full = len(first) - len(first) % chunk_size
    chunks = first[:full].reshape(-1, chunk_size, *first.shape[1:]) if full else first[None]
    codec.quantize(np.ascontiguousarray(chunks, np.float32))
