"""Encoding chunks for the cache writer: the tasks its encoder threads run.

quant is quantised by the writer itself, in torch on all cores, many chunks at a time; only its
lossless stage runs here (:func:`compress_group`). zfp and none encode chunk by chunk here
(:func:`encode_group`), and are decoded again to measure their error when asked to verify.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

import numpy as np

from freezecache.codecs import Codec
from freezecache.codecs.quant import QuantCodec, Quantized

TASK_CHUNKS = 32  # chunks per encoder-thread task


@dataclass(frozen=True)
class Encoded:
    """One chunk after encoding (and verification)."""

    index: int
    blob: bytes
    crc: int
    error: float
    extra_blob: bytes | None
    extra_crc: int
    extra_error: float
    seconds: float
    code_bytes: int  # quant code width; 0 for other codecs


def _max_error(x: np.ndarray, decoded: np.ndarray) -> float:
    """Exact max |x - decoded| (float64: a float32 difference could round below the bound)."""
    if x.size == 0:
        return 0.0
    return float(np.abs(x.astype(np.float64) - decoded).max())


def encode_chunk(
    codec: Codec, index: int, x: np.ndarray, extra: np.ndarray | None, verify: bool
) -> Encoded:
    """Encode one chunk (and its extra data), optionally decoding it to measure the error."""
    start = time.perf_counter()
    blob = codec.encode(x)
    error = _max_error(x, codec.decode(blob, x.shape)) if verify else float("nan")
    extra_blob, extra_error = None, 0.0
    if extra is not None:
        extra_blob = codec.encode(extra)
        if verify:
            extra_error = _max_error(extra, codec.decode(extra_blob, extra.shape))
    return Encoded(
        index,
        blob,
        zlib.crc32(blob),
        error,
        extra_blob,
        zlib.crc32(extra_blob or b""),
        extra_error,
        time.perf_counter() - start,
        0,
    )


def encode_group(
    codec: Codec, first: int, xs: np.ndarray, extras: np.ndarray | None, verify: bool
) -> list[Encoded]:
    """Encode chunks ``xs`` (m, k, ...) one by one (zfp, none): the thread-pool task."""
    return [
        encode_chunk(codec, first + j, xs[j], None if extras is None else extras[j], verify)
        for j in range(len(xs))
    ]


def compress_group(
    codec: QuantCodec, first: int, x: Quantized, extra: Quantized | None, quant_s: float
) -> list[Encoded]:
    """zstd stage of quant chunks already quantised by the caller: the thread-pool task."""
    start = time.perf_counter()
    blobs = [codec.compress(p) for p in x.payloads]
    extra_blobs = [codec.compress(p) for p in extra.payloads] if extra else [None] * len(blobs)
    crcs = [(zlib.crc32(b), zlib.crc32(e or b"")) for b, e in zip(blobs, extra_blobs, strict=True)]
    seconds = (time.perf_counter() - start + quant_s) / len(blobs)
    return [
        Encoded(
            first + j,
            blob,
            crcs[j][0],
            x.errors[j],
            extra_blobs[j],
            crcs[j][1],
            extra.errors[j] if extra else 0.0,
            seconds,
            x.widths[j],
        )
        for j, blob in enumerate(blobs)
    ]
