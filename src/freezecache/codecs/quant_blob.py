"""The bytes of a quant blob: payload layouts, the lossless stage and their parsing.

zstd coding: ``zstd(FCQ2 header | lo float32 (C,) | byte planes)`` (absolute tolerance, cache
format 2 as before) or ``zstd(FCR2 header | [steps] | lo | byte planes)`` (relative). rANS
coding: the quantiser emits an FCP3 payload (header, chunk shape, [steps], [lo], byte planes)
and :func:`compress` turns it into an FCQ3 blob (header, lane counts, [steps], [lo], rANS words,
escapes), stored as it is: rANS output does not compress further. The decoder reads every
layout, whatever coding a codec was built with.
"""

from __future__ import annotations

import base64
import functools
import math
import struct
from collections.abc import Callable

import numpy as np
import torch

from freezecache.codecs.base import optional, zstd_compressor, zstd_decompressor
from freezecache.codecs.planes import join_planes
from freezecache.core.errors import FreezecacheError

_QUANT_HEADER = struct.Struct("<4sBI")  # magic, code width in bytes, number of channels
_QUANT_MAGIC = b"FCQ2"
_REL_HEADER = struct.Struct("<4sBBI")  # magic, code width, flags, number of channels
_REL_MAGIC = b"FCR2"
_RANS_HEADER = struct.Struct("<4sBBBBI")  # magic, flags, code width, lanes, 0, channels
_RANS_MAGIC = b"FCQ3"
_PAYLOAD_MAGIC = b"FCP3"
_PAYLOAD_DIMS = struct.Struct("<B")  # number of dims of the chunk, then int64 dims
_FLAG_STEPS = 1  # the blob carries float32 steps per channel (a channel subset, e.g. extras)
_FLAG_LO_ZERO = 2  # every lo is 0 (ReLU features): lo is not stored

Steps = Callable[[], "np.ndarray | float"]  # the codec's own steps, asked for only when needed


def _rans():
    return optional("freezecache.codecs.rans", "numba", "cache.coding: zstd")


@functools.lru_cache(maxsize=16)
def tables(encoded: str):
    """rANS tables from their options string (cached: building the decoding table costs a few
    milliseconds, and every loader batch rebuilds the codec)."""
    import zstandard

    rans = _rans()
    try:
        alphabet, data = encoded.split(":", 1)
        freq = np.frombuffer(zstd_decompressor().decompress(base64.b64decode(data)), np.uint16)
        return rans.Tables(freq.reshape(rans.N_CTX, int(alphabet)))
    except (ValueError, zstandard.ZstdError) as err:
        raise FreezecacheError(
            f"quant rANS tables are malformed ({err}) — the cache is corrupt; rebuild it"
        ) from None


def fit_tables(q: torch.Tensor, planes: np.ndarray, width: int) -> str:
    """rANS tables fitted on a batch's codes (at most about 4M of them), as an options string."""
    m = max(1, min(q.shape[0], (1 << 22) // max(1, q[0].numel())))
    codes = planes[:m, 0] if width == 1 else join_planes(torch.from_numpy(planes[:m])).numpy()
    freq = _rans().fit_tables(codes.reshape(m * q.shape[1], *q.shape[2:]))
    packed = zstd_compressor(19).compress(freq.tobytes())
    return f"{freq.shape[1]}:{base64.b64encode(packed).decode()}"


# -- payloads (before the lossless stage) --------------------------------------------------------
def pack_zstd(lo, planes, width, steps, relative: bool) -> bytes:
    """Format-2 payload (absolute, all channels) or FCR2 (relative)."""
    if not relative:
        head = _QUANT_HEADER.pack(_QUANT_MAGIC, width, lo.shape[0])
        return b"".join((head, lo.tobytes(), planes.tobytes()))
    flags = 0 if steps is None else _FLAG_STEPS
    head = _REL_HEADER.pack(_REL_MAGIC, width, flags, lo.shape[0])
    extra = b"" if steps is None else steps.tobytes()
    return b"".join((head, extra, lo.tobytes(), planes.tobytes()))


def pack_rans(lo, planes, width, steps, shape) -> bytes:
    """Codes, shape and what the blob header needs, for :func:`compress` to rANS-code."""
    flags = (0 if steps is None else _FLAG_STEPS) | (0 if lo.any() else _FLAG_LO_ZERO)
    head = _RANS_HEADER.pack(_PAYLOAD_MAGIC, flags, width, 0, 0, lo.shape[0])
    dims = _PAYLOAD_DIMS.pack(len(shape)) + np.asarray(shape, np.int64).tobytes()
    parts = [head, dims, b"" if steps is None else steps.tobytes()]
    parts += [b"" if flags & _FLAG_LO_ZERO else lo.tobytes(), planes.tobytes()]
    return b"".join(parts)


def compress(payload: bytes, zstd_level: int, tables_key: str | None) -> bytes:
    """Lossless stage of encoding (thread-safe; releases the GIL)."""
    if payload[:4] != _PAYLOAD_MAGIC:
        return zstd_compressor(zstd_level).compress(payload)
    _, flags, width, _, _, channels = _RANS_HEADER.unpack_from(payload)
    offset = _RANS_HEADER.size
    (ndim,) = _PAYLOAD_DIMS.unpack_from(payload, offset)
    shape = tuple(np.frombuffer(payload, np.int64, ndim, offset + 1).tolist())
    offset += 1 + 8 * ndim
    meta_end = offset + 4 * channels * (bool(flags & _FLAG_STEPS) + (not flags & _FLAG_LO_ZERO))
    planes = np.frombuffer(payload, np.uint8, offset=meta_end).reshape(width, -1)
    codes = planes[0] if width == 1 else join_planes(torch.from_numpy(planes[None].copy()))[0]
    words, escapes, lane_words, lane_escapes = tables(tables_key).encode(
        np.asarray(codes).reshape(shape)
    )
    lanes = len(lane_words)
    head = _RANS_HEADER.pack(_RANS_MAGIC, flags, width, lanes, 0, channels)
    counts = np.concatenate([lane_words, lane_escapes]).astype(np.uint32)
    pad = b"\0\0" if len(words) % 2 else b""  # keeps the escapes 4-byte aligned
    parts = (head, counts.tobytes(), payload[offset:meta_end], words.tobytes(), pad)
    return b"".join((*parts, escapes.tobytes()))


# -- parsing -------------------------------------------------------------------------------------
def unpack(buf: bytes, shape: tuple[int, ...], lo_shape: tuple[int, ...], steps: Steps,
           tables_key: str | None):  # fmt: skip
    """(planes (width, numel) uint8, lo (``lo_shape``) float32, steps) of a blob: its steps when
    it carries them, else ``steps()``."""
    if bytes(buf[:4]) == _RANS_MAGIC:
        try:
            return _parse_rans(buf, shape, lo_shape, steps, tables_key)
        except (ValueError, struct.error):
            raise FreezecacheError(
                "quant blob is truncated — the cache is corrupt; rebuild it"
            ) from None
    payload = zstd_decompressor().decompress(buf)
    magic = payload[:4]
    if magic == _QUANT_MAGIC:
        _, width, channels = _QUANT_HEADER.unpack_from(payload)
        offset, flags = _QUANT_HEADER.size, 0
    elif magic == _REL_MAGIC:
        _, width, flags, channels = _REL_HEADER.unpack_from(payload)
        offset = _REL_HEADER.size
    else:
        raise FreezecacheError("quant blob has a bad header — the cache is corrupt; rebuild it")
    step, offset = _read_steps(payload, offset, flags, channels, lo_shape, steps)
    lo = np.frombuffer(payload, np.float32, channels, offset).reshape(lo_shape)
    planes = np.frombuffer(payload, np.uint8, offset=offset + 4 * channels)
    return planes.reshape(width, -1), lo, step


def _read_steps(buf, offset: int, flags: int, channels: int, lo_shape, steps: Steps):
    """Steps stored in a blob (a channel subset), else the codec's; and the next offset."""
    if flags & _FLAG_STEPS:
        stored = np.frombuffer(buf, np.float32, channels, offset)
        return stored.reshape(lo_shape), offset + 4 * channels
    return steps(), offset


def _parse_rans(buf: bytes, shape, lo_shape, steps: Steps, tables_key: str | None):
    """:func:`unpack` of an FCQ3 blob, without the error translation."""
    _, flags, width, lanes, _, channels = _RANS_HEADER.unpack_from(buf)
    offset = _RANS_HEADER.size
    counts = np.frombuffer(buf, np.uint32, 2 * lanes, offset).astype(np.int64)
    step, offset = _read_steps(buf, offset + 8 * lanes, flags, channels, lo_shape, steps)
    if flags & _FLAG_LO_ZERO:
        lo = np.zeros(lo_shape, np.float32)
    else:
        lo = np.frombuffer(buf, np.float32, channels, offset).reshape(lo_shape)
        offset += 4 * channels
    n_words, n_escapes = int(counts[:lanes].sum()), int(counts[lanes:].sum())
    words = np.frombuffer(buf, np.uint16, n_words, offset)
    offset += 2 * n_words + 2 * (n_words % 2)
    escapes = np.frombuffer(buf, np.uint32, n_escapes, offset)
    if tables_key is None:
        raise FreezecacheError(
            "quant rANS blob but the codec has no tables — the cache attributes are corrupt"
        )
    planes = np.empty((width, math.prod(shape)), np.uint8)
    ok = tables(tables_key).decode_into(
        words, escapes, counts[:lanes], counts[lanes:], shape, planes
    )
    if not ok:
        raise FreezecacheError("quant blob is truncated — the cache is corrupt; rebuild it")
    return planes, lo, step
