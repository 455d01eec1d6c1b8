"""A batch of quant codes as the cache stores them, after the lossless stage and before
dequantisation: what a training step reads from the cache.

The codes stay in the byte planes the payloads hold: one flat uint8 buffer with every payload of
the batch back to back, and per sample where its planes start, how far apart they are and how
many there are. Decoding and augmenting then take one pass over the codes, a byte per value,
instead of several passes over float32 maps (:mod:`freezecache.cache.fused` on the CPU;
:func:`planes` and :func:`freezecache.codecs.planes.dequantize` on a device).
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from freezecache.codecs.base import zstd_decompressor
from freezecache.codecs.planes import channel_axis, dequantize
from freezecache.codecs.quant import QuantCodec

# The zstd payload headers of freezecache.codecs.quant_blob: FCQ2 (magic, width, channels) and
# FCR2 (magic, width, flags, channels); flag 1: float32 steps per channel follow the header.
_FCQ2 = struct.Struct("<4sBI")
_FCR2 = struct.Struct("<4sBBI")
_STEPS_FLAG = 1


def _payload(codec: QuantCodec, blob, shape: tuple[int, ...]) -> tuple[np.ndarray, int, int, int]:
    """(payload bytes, width, offset of lo, offset of the planes) of one blob."""
    if bytes(blob[:4]) == b"FCQ3":  # rANS: the codec decodes the codes
        planes, lo = codec.unpack(blob, shape)
        data = np.concatenate([lo.reshape(-1).view(np.uint8), planes.reshape(-1)])
        return data, planes.shape[0], 0, lo.size * 4
    data = np.frombuffer(zstd_decompressor().decompress(blob), np.uint8)
    magic = bytes(data[:4])
    if magic == b"FCQ2":
        _, width, channels = _FCQ2.unpack_from(data)
        at = _FCQ2.size
    else:  # FCR2 (anything else fails in the codec, which wrote it)
        _, width, flags, channels = _FCR2.unpack_from(data)
        at = _FCR2.size + (4 * channels if flags & _STEPS_FLAG else 0)
    return data, width, at, at + 4 * channels


def unpack_chunks(codec: QuantCodec, blobs: list, chunk_sizes: list[int], sample_shape,
                  lo_size: int) -> dict:  # fmt: skip
    """The codes of ``blobs`` (one per chunk, ``chunk_sizes`` samples each) in one buffer, with
    per chunk: where its planes start (``at``), its code width and its lo (``lo_size``)."""
    parts, at, width, lo = [], [], [], []
    base = 0
    for blob, k in zip(blobs, chunk_sizes, strict=True):
        data, w, lo_at, planes_at = _payload(codec, blob, (k, *sample_shape))
        lo.append(data[lo_at:planes_at].view(np.float32))
        at.append(base + planes_at)
        width.append(w)
        parts.append(data)
        base += len(data)
    return {
        "buf": np.concatenate(parts) if len(parts) > 1 else parts[0].copy(),
        "at": np.asarray(at, np.int64),
        "width": np.asarray(width, np.int64),
        "lo": np.stack(lo).astype(np.float32, copy=False).reshape(len(lo), lo_size),
        "k": np.asarray(chunk_sizes, np.int64),
    }


def gather(chunks: dict, ids, numel: int) -> dict:
    """Per sample of chunks ``ids`` (of :func:`unpack_chunks`'s output): the whole buffer (a
    reference, no copy), where the sample's first plane starts (``at``), the bytes between its
    planes (``stride``), its code width and its lo (float32)."""
    ids = np.asarray(ids, np.int64)
    k = chunks["k"][ids]
    chunk = np.repeat(ids, k)  # the chunk of each sample
    j = np.arange(len(chunk)) - np.repeat(np.cumsum(k) - k, k)  # the sample's place in it
    return {
        "buf": chunks["buf"],
        "at": chunks["at"][chunk] + j * numel,
        "stride": chunks["k"][chunk] * numel,
        "width": chunks["width"][chunk],
        "lo": chunks["lo"][chunk],
    }


def pack(codec: QuantCodec, blobs: list, chunk_sizes: list[int], sample_shape, lo_size: int):
    """The codes of ``blobs`` (one per chunk, ``chunk_sizes`` samples each) as one packed part:
    a dict of numpy arrays, ``buf`` (uint8), per sample ``at`` (first plane byte), ``stride``
    (bytes between planes), ``width`` (planes) and ``lo`` (float32, ``lo_size`` values). Steps
    are the codec's (:meth:`QuantCodec.step_for`): the same for every blob."""
    chunks = unpack_chunks(codec, blobs, chunk_sizes, sample_shape, lo_size)
    return gather(chunks, np.arange(len(blobs)), math.prod(sample_shape))


def nbytes(part: dict) -> int:
    """The bytes a packed part (or unpacked chunks) holds."""
    return sum(a.nbytes for a in part.values())


def planes(part: dict, numel: int) -> torch.Tensor:
    """The byte planes of a packed part as uint8 (B, widest, numel), zero-padded to the widest
    code (what :func:`freezecache.codecs.planes.dequantize` reads, on any device)."""
    b, top = len(part["at"]), int(part["width"].max())
    buf = torch.as_tensor(part["buf"])
    out = torch.zeros((b, top, numel), dtype=torch.uint8)
    for j in range(top):
        rows = torch.as_tensor(np.flatnonzero(part["width"] > j))
        start = torch.as_tensor(part["at"])[rows] + j * torch.as_tensor(part["stride"])[rows]
        out[rows, j] = buf[start[:, None] + torch.arange(numel)]
    return out


def steps(codec: QuantCodec, sample_shape, channels=None) -> np.ndarray:
    """The decoding step of each channel of ``sample_shape``, float32 (one value repeated for
    an absolute tolerance); ``channels``: a CNN channel subset (the stored flipped channels),
    whose steps are the features' steps at those channels."""
    axis = channel_axis(len(sample_shape) + 1, codec.channel_axis) - 1
    if not codec.relative:
        return np.full(sample_shape[axis], codec.step, np.float32)
    every = codec.steps(len(codec.channel_scale))
    return every if channels is None else every[np.asarray(channels)]


def decode(part: dict, sample_shape, lo_shape, step: np.ndarray, device) -> torch.Tensor:
    """The float32 features (B, *sample_shape) of a packed part, decoded on ``device``: the
    byte planes travel (a byte per value), ``q * step + lo`` runs there. ``lo_shape``: a
    sample's lo, e.g. (C, 1, 1) for maps, (1, D) for tokens; ``step`` (C,) per channel."""
    b = len(part["at"])
    lo = torch.from_numpy(part["lo"]).view(b, *lo_shape).to(device)
    step_t = torch.from_numpy(np.ascontiguousarray(step, np.float32)).view(lo_shape).to(device)
    codes = planes(part, math.prod(sample_shape)).to(device)
    return dequantize(codes, lo, step_t, tuple(sample_shape))
