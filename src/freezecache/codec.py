"""Error-bounded codecs for chunks of float32 activations.

A chunk is an array ``(k, *sample_shape)`` of ``k`` consecutive samples. Every codec turns a
chunk into one ``bytes`` blob and back; the caller keeps the shape (the cache store records it).

- ``zfp``: ZFP fixed-accuracy mode (zfpy). zfp works on blocks of 4^d values, so a chunk of one
  sample is compressed as its own ``(C, H, W)`` / ``(N, D)`` array; padding a sample axis of
  length 1 to 4 would waste 3/4 of every block. ``k > 1`` compresses the paper's
  ``(k, C, H, W)`` / ``(k, N, D)`` array.
- ``quant``: uniform quantisation per chunk and channel, then zstandard; the blob is
  ``zstd(header | lo float32 (C,) | codes uint8/16/32)``. The step is 2 * tolerance * (1 - 1e-3)
  cut to 4 significant bits, which makes the float32 decode exact (:func:`exact_step`).
  Decoding is one multiply-add that can run on the training device (:func:`dequantize`).
- ``none``: raw float32 (exact) or float16 bytes. Not bounded by ``tolerance``: the float16
  error is whatever fp16 rounding gives, and the cache records the measured maximum.

zfp and quant guarantee ``max|x - decode(encode(x))| <= tolerance``; the cache writer
verifies it on every chunk.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import zfpy
import zstandard

from freezecache.errors import FreezecacheError

# Why: zstd contexts are not safe to share between threads, and building one per blob is slow.
_ZSTD_LOCAL = threading.local()
# float32 holds every integer multiple of a power of two up to 2^24 of them exactly.
_EXACT = 2**24
_QUANT_HEADER = struct.Struct("<4sBI")  # magic, code width in bytes, number of channels
_QUANT_MAGIC = b"FCQ2"


class Codec(Protocol):
    """Turns a float32 chunk ``(k, *sample_shape)`` into bytes and back."""

    name: str
    tolerance: float
    bounded: bool  # True when max abs error <= tolerance is guaranteed

    @property
    def options(self) -> dict:
        """Keyword options that rebuild this codec through :func:`make_codec`."""
        ...

    def encode(self, x: np.ndarray) -> bytes:
        """Compress a float32 chunk of any shape ``(k, *sample_shape)``."""
        ...

    def decode(self, buf: bytes, shape: tuple[int, ...]) -> np.ndarray:
        """Decompress a blob into a float32 array of ``shape``."""
        ...


def check_finite(x: np.ndarray) -> None:
    """Raise a user-facing error when activations hold NaN or Inf."""
    if not np.isfinite(x).all():
        raise FreezecacheError(
            "activations contain NaN/Inf — the frozen prefix diverged; "
            "check the checkpoint at the freeze point or lower the learning rate"
        )


def _as_f32(x: np.ndarray) -> np.ndarray:
    """C-contiguous float32 view or copy of ``x`` (zfpy and tobytes need it)."""
    return np.ascontiguousarray(x, dtype=np.float32)


def _zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    """Per-thread zstd compressor for ``level``."""
    cache = _ZSTD_LOCAL.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    """Per-thread zstd decompressor."""
    if not hasattr(_ZSTD_LOCAL, "decompressor"):
        _ZSTD_LOCAL.decompressor = zstandard.ZstdDecompressor()
    return _ZSTD_LOCAL.decompressor


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
        x = _as_f32(x)
        check_finite(x)
        if x.shape[0] == 1:
            x = x[0]  # (1, C, H, W) -> (C, H, W): no 4x padding along the sample axis
        if not 1 <= x.ndim <= 4:
            raise FreezecacheError(
                f"zfp compresses 1-4 dimensional chunks, got shape {x.shape} — "
                "use chunk_size 1 or the quant codec for this activation shape"
            )
        return zfpy.compress_numpy(x, tolerance=self.tolerance)

    def decode(self, buf: bytes, shape: tuple[int, ...]) -> np.ndarray:
        """Decompress into float32 of ``shape``."""
        return zfpy.decompress_numpy(buf).reshape(shape)


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
        x = _as_f32(x)
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


def _channel_axis(ndim: int, option: int | None) -> int:
    """Axis holding channels: 1 for CNN maps (k, C, H, W), the last axis for tokens (k, N, D)."""
    if option is not None:
        return option % ndim
    return 1 if ndim == 4 else ndim - 1


def _dequantize_np(q: np.ndarray, lo: np.ndarray, step: float) -> np.ndarray:
    """numpy twin of :func:`dequantize`: the same float32 multiply, then add."""
    return q.astype(np.float32) * np.float32(step) + lo


def exact_step(tolerance: float) -> tuple[float, float]:
    """Quantisation step <= 2 * tolerance * (1 - 1e-3) and its grain 2^e (step = a * 2^e, a < 16).

    Keeping only 4 significant bits costs at most 1/8 of the step (about 0.1 bit per value) and
    makes ``q * step + lo`` exact in float32 whenever lo is a multiple of the grain and the
    result stays below 2^24 grains: the decoded value is then exactly ``lo + q * step``.
    """
    target = 2.0 * tolerance * (1.0 - 1e-3)
    grain = 2.0 ** (np.floor(np.log2(target)) - 3)
    return float(np.floor(target / grain) * grain), float(grain)


def _code_width(max_code: int) -> int:
    """Bytes per code: the narrowest of 1, 2 or 3 that holds ``max_code`` (codes stay < 2^24)."""
    return 1 if max_code < 2**8 else 2 if max_code < 2**16 else 3


def byte_planes(q: torch.Tensor, width: int) -> torch.Tensor:
    """Integer-valued codes ``(m, ...)`` as little-endian byte planes ``(m, width, numel)``.

    Plane j holds byte j of every code. Splitting the planes before zstd lets it see the mostly
    empty high bytes as one long run: 0.18 instead of 0.22 of float32 on ResNet-20 features at
    tolerance 0.01, where codes need two bytes.
    """
    m = q.shape[0]
    if width == 1:
        return q.reshape(m, 1, -1).to(torch.uint8)
    codes = q.reshape(m, -1).to(torch.int32)
    planes = torch.empty((m, width, codes.shape[1]), dtype=torch.uint8, device=q.device)
    for j in range(width):  # written plane by plane: no transposed copy
        planes[:, j].copy_((codes >> (8 * j)) & 255)
    return planes


def join_planes(planes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`byte_planes`: ``(m, width, numel)`` uint8 -> int32 codes ``(m, numel)``."""
    q = planes[:, 0].to(torch.int32)
    for j in range(1, planes.shape[1]):
        q |= planes[:, j].to(torch.int32) << (8 * j)
    return q


# Quantising in float32 rounds (x - lo) / step by a relative 2^-23 at most, i.e. by at most
# range * 2^-23 in value. The step leaves tolerance * 1e-3 of margin, so the float32 result
# provably keeps the bound while the chunk's range stays below 5000 * tolerance (about 2500
# codes). Wider chunks are quantised again in float64 and their error is measured.
_F32_SAFE_RANGE = 5000.0


@dataclass(frozen=True)
class Quantized:
    """Chunks after quantisation, before zstd: ``payloads[i]`` is chunk i's uncompressed blob."""

    payloads: list[bytes]
    errors: list[float]  # per chunk: the proved bound step / 2, or the measured max error
    widths: list[int]  # code bytes per chunk

    def __getitem__(self, rows: slice) -> Quantized:
        """Chunks ``rows`` only."""
        return Quantized(self.payloads[rows], self.errors[rows], self.widths[rows])


class QuantCodec:
    """Uniform quantisation per chunk and channel with a guaranteed max-abs-error bound.

    ``lo`` is the channel minimum over the chunk rounded down to the step's grain,
    ``q = round((x - lo) / step)`` and decoding is ``q * step + lo`` in float32. With the step of
    :func:`exact_step` that float32 arithmetic has no rounding at all, so the error is at most
    ``step / 2 < tolerance`` on every device, fused multiply-add or not. The encoder refuses
    chunks where that exactness would fail: values or ranges beyond about 2e6 * tolerance,
    i.e. a tolerance near float32 resolution.

    The blob is ``zstd(header | lo float32 (C,) | byte planes uint8 (width, numel))``; see
    :func:`byte_planes`. :meth:`quantize` does the arithmetic for many chunks at once in torch
    (any device, all cores), and :meth:`compress` the zstd part, so the cache writer can run
    zstd in threads while torch quantises the next batch.
    """

    name = "quant"
    bounded = True

    def __init__(
        self, tolerance: float, zstd_level: int = 1, channel_axis: int | None = None
    ) -> None:
        if not 1 <= zstd_level <= 22:
            raise FreezecacheError(
                f"codec quant: zstd_level {zstd_level} is out of range — use 1 to 3 for speed"
            )
        self.tolerance = tolerance
        self.zstd_level = zstd_level
        self.channel_axis = channel_axis
        self.step, self.grain = exact_step(tolerance)

    @property
    def options(self) -> dict:
        """zstd level and channel axis (None: inferred from the chunk's rank)."""
        return {"zstd_level": self.zstd_level, "channel_axis": self.channel_axis}

    def lo_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``lo``: keepdims over every axis but the channel axis, e.g. (1, C, 1, 1)."""
        axis = _channel_axis(len(shape), self.channel_axis)
        return tuple(n if i == axis else 1 for i, n in enumerate(shape))

    def quantize(self, chunks: np.ndarray | torch.Tensor) -> Quantized:
        """Quantise equal chunks ``(m, k, *sample_shape)`` at once; returns uncompressed blobs."""
        x = torch.as_tensor(chunks)
        if x.dtype != torch.float32:
            x = x.float()
        axis = 1 + _channel_axis(x.ndim - 1, self.channel_axis)
        dims = tuple(i for i in range(1, x.ndim) if i != axis)
        lo = x.amin(dim=dims, keepdim=True).mul_(1.0 / self.grain).floor_().mul_(self.grain)
        q = (x - lo).mul_(1.0 / self.step).round_()
        peaks = q.amax(dim=tuple(range(1, x.ndim)))
        # NaN and Inf reach lo or the codes (amin/amax propagate NaN): no separate pass needed.
        if not (bool(torch.isfinite(peaks).all()) and bool(torch.isfinite(lo).all())):
            check_finite(np.array([np.nan]))  # raises the user-facing error
        max_codes = [int(c) for c in peaks.cpu()]
        errors = [self.step / 2] * len(max_codes)  # the proved bound, see _F32_SAFE_RANGE
        limit = _F32_SAFE_RANGE * self.tolerance
        wide = [i for i, c in enumerate(max_codes) if c * self.step > limit]
        if wide:  # beyond the float32 proof: float64 codes and a measured error
            idx = torch.tensor(wide, device=x.device)
            x64, lo64 = x[idx].double(), lo[idx].double()
            q64 = torch.round((x64 - lo64) / self.step)
            q[idx] = q64.float()
            decoded = q64.float() * self.step + lo[idx]  # the decoder's float32 arithmetic
            err = (x64 - decoded.double()).abs().amax(dim=tuple(range(1, x.ndim)))
            for j, i in enumerate(wide):
                max_codes[i], errors[i] = int(q64[j].max()), float(err[j])
        lo_cpu = lo.reshape(len(max_codes), -1).cpu().numpy()
        for i, max_code in enumerate(max_codes):
            self._check_exact(np.abs(lo_cpu[i]).max(initial=0.0) + max_code * self.step, max_code)
        widths = [_code_width(c) for c in max_codes]
        planes = byte_planes(q, max(widths)).cpu().numpy()
        payloads = [
            b"".join(
                (
                    _QUANT_HEADER.pack(_QUANT_MAGIC, width, lo_cpu.shape[1]),
                    lo_cpu[i].tobytes(),
                    planes[i, :width].tobytes(),
                )
            )
            for i, width in enumerate(widths)
        ]
        return Quantized(payloads, errors, widths)

    def compress(self, payload: bytes) -> bytes:
        """zstd stage of encoding (thread-safe; releases the GIL)."""
        return _zstd_compressor(self.zstd_level).compress(payload)

    def encode(self, x: np.ndarray) -> bytes:
        """Quantise one chunk, pack its byte planes and zstd-compress."""
        return self.compress(self.quantize(_as_f32(x)[None]).payloads[0])

    def _check_exact(self, peak: float, max_code: int) -> None:
        """Refuse chunks whose decode would round in float32 (see the class docstring)."""
        peak += self.step
        if max_code * (self.step / self.grain) >= _EXACT or peak / self.grain >= _EXACT:
            raise FreezecacheError(
                f"quant tolerance {self.tolerance:g} is too fine for activations up to "
                f"{peak:g} (float32 cannot hold them on that grid) — raise the tolerance or use zfp"
            )

    def unpack(self, buf: bytes, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Lossless part of decoding: byte planes (width, numel) uint8 and ``lo`` (float32).

        ``lo`` has the keepdims shape :meth:`lo_shape` so that ``q * step + lo`` broadcasts.
        """
        payload = _zstd_decompressor().decompress(buf)
        magic, width, channels = _QUANT_HEADER.unpack_from(payload)
        if magic != _QUANT_MAGIC:
            raise FreezecacheError("quant blob has a bad header — the cache is corrupt; rebuild it")
        offset = _QUANT_HEADER.size
        lo = np.frombuffer(payload, np.float32, channels, offset).reshape(self.lo_shape(shape))
        planes = np.frombuffer(payload, np.uint8, offset=offset + 4 * channels)
        return planes.reshape(width, -1), lo

    def decode(self, buf: bytes, shape: tuple[int, ...]) -> np.ndarray:
        """Full decode on CPU (same arithmetic as :func:`dequantize`)."""
        planes, lo = self.unpack(buf, shape)
        q = planes[0].astype(np.int32)
        for j in range(1, planes.shape[0]):
            q |= planes[j].astype(np.int32) << (8 * j)
        return _dequantize_np(q.reshape(shape), lo, self.step)


def dequantize(
    planes: torch.Tensor, lo: torch.Tensor, step: float, shape: tuple[int, ...]
) -> torch.Tensor:
    """Device part of quant decoding: join the byte planes, then ``q * step + lo`` in float32.

    ``planes`` is uint8 ``(B, width, numel)`` (one sample per row); ``lo`` broadcasts against
    ``(B, *shape)`` per channel, e.g. (B, C, 1, 1) for maps or (B, 1, D) for tokens. Both float32
    ops are exact for the codes :class:`QuantCodec` writes, so the result equals the CPU decode
    bit for bit on any device.
    """
    q = join_planes(planes).reshape(planes.shape[0], *shape)
    return q.to(torch.float32).mul_(step).add_(lo)


_CODECS = {"zfp": ZfpCodec, "quant": QuantCodec, "none": NoneCodec}


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
