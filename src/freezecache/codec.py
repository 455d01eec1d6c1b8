"""Error-bounded codecs for chunks of float32 activations.

A chunk is an array ``(k, *sample_shape)`` of ``k`` consecutive samples. Every codec turns a
chunk into one ``bytes`` blob and back; the caller keeps the shape (the cache store records it).

- ``zfp``: ZFP fixed-accuracy mode (zfpy). zfp works on blocks of 4^d values, so a chunk of one
  sample is compressed as its own ``(C, H, W)`` / ``(N, D)`` array; padding a sample axis of
  length 1 to 4 would waste 3/4 of every block. ``k > 1`` compresses the paper's
  ``(k, C, H, W)`` / ``(k, N, D)`` array.
- ``quant``: uniform quantisation per chunk and channel, then a lossless stage. The step is
  2 * tolerance * (1 - 1e-3) cut to 4 significant bits, which makes the float32 decode exact
  (:func:`exact_step`). The tolerance is absolute, or with ``relative=True`` a fraction of each
  channel's standard deviation measured on the first batch (one exact step per channel). The
  lossless stage is zstd on byte planes (``coding="zstd"``, default: ``zstd(FCQ2 header | lo
  float32 (C,) | codes)``, cache format 2 as before) or context-modelled rANS (``coding="rans"``,
  :mod:`freezecache.rans`: 20-45% smaller, 2-4x slower; blob ``FCQ3 header | counts | lo | rANS
  words | escapes``; see benchmarks/bench_coding.py).
  Decoding the codes runs on the CPU; ``q * step + lo`` can run on the training device
  (:func:`dequantize`).
- ``none``: raw float32 (exact) or float16 bytes. Not bounded by ``tolerance``: the float16
  error is whatever fp16 rounding gives, and the cache records the measured maximum.

zfp and absolute quant guarantee ``max|x - decode(encode(x))| <= tolerance``, the cache writer
verifies it on every chunk; relative quant guarantees ``tolerance * scale_c`` per channel c and
checks it itself (:class:`QuantCodec`).
"""

from __future__ import annotations

import base64
import functools
import math
import struct
import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import zfpy
import zstandard

from freezecache import rans
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


def _dequantize_np(q: np.ndarray, lo: np.ndarray, step: float | np.ndarray) -> np.ndarray:
    """numpy twin of :func:`dequantize`: the same float32 multiply, then add."""
    return q.astype(np.float32) * np.asarray(step, np.float32) + lo


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
    """Chunks after quantisation, before the lossless stage: ``payloads[i]`` is chunk i's
    uncompressed blob."""

    payloads: list[bytes]
    errors: list[float]  # per chunk: the proved bound max_c step_c / 2, or the measured max error
    widths: list[int]  # code bytes per chunk
    channel_errors: np.ndarray | None = None  # (chunks, C): the same per channel

    def __getitem__(self, rows: slice) -> Quantized:
        """Chunks ``rows`` only."""
        per_channel = None if self.channel_errors is None else self.channel_errors[rows]
        return Quantized(self.payloads[rows], self.errors[rows], self.widths[rows], per_channel)


# Payloads and blobs. zstd coding: zstd(FCQ2 header | lo | byte planes), format 2 as before, and
# FCR2 (relative tolerance) with a flags byte and optional per-channel steps. rANS coding: the
# FCQ3 blob is stored as it is (rANS output does not compress further), its payload is FCP3.
_REL_HEADER = struct.Struct("<4sBBI")  # magic, code width, flags, number of channels
_REL_MAGIC = b"FCR2"
_RANS_HEADER = struct.Struct("<4sBBBBI")  # magic, flags, code width, lanes, 0, channels
_RANS_MAGIC = b"FCQ3"
_PAYLOAD_MAGIC = b"FCP3"
_PAYLOAD_DIMS = struct.Struct("<B")  # number of dims of the chunk, then int64 dims
_FLAG_STEPS = 1  # the blob carries float32 steps per channel (a channel subset, e.g. extras)
_FLAG_LO_ZERO = 2  # every lo is 0 (ReLU features): lo is not stored
CODINGS = ("rans", "zstd")
# Relative tolerance: a channel whose spread is below this share of the widest channel's counts
# as that spread (a dead channel would otherwise get a zero tolerance).
_SCALE_FLOOR = 1e-3


def channel_std(x: np.ndarray | torch.Tensor, axis: int) -> np.ndarray:
    """Standard deviation per channel (``axis``) over every other axis, float64 (C,).

    This is the ``channel_scale`` a relative-tolerance codec measures on the first batch it
    quantises; callers may measure it on more data and pass it to :func:`make_codec`.
    """
    x = torch.as_tensor(x)
    c = x.shape[axis]
    flat = x.movedim(axis, 0).reshape(c, -1).double()
    return flat.std(dim=1, correction=0).cpu().numpy()


@functools.lru_cache(maxsize=16)
def _tables(encoded: str) -> rans.Tables:
    """rANS tables from their :attr:`QuantCodec.options` string (cached: building the decoding
    table costs a few milliseconds, and every loader batch rebuilds the codec)."""
    try:
        alphabet, data = encoded.split(":", 1)
        freq = np.frombuffer(_zstd_decompressor().decompress(base64.b64decode(data)), np.uint16)
        return rans.Tables(freq.reshape(rans.N_CTX, int(alphabet)))
    except (ValueError, zstandard.ZstdError) as err:
        raise FreezecacheError(
            f"quant rANS tables are malformed ({err}) — the cache is corrupt; rebuild it"
        ) from None


class QuantCodec:
    """Uniform quantisation per chunk and channel with a guaranteed max-abs-error bound.

    ``lo`` is the channel minimum over the chunk rounded down to the step's grain,
    ``q = round((x - lo) / step)`` and decoding is ``q * step + lo`` in float32. With the step of
    :func:`exact_step` that float32 arithmetic has no rounding at all, so the error is at most
    ``step / 2 < tolerance`` on every device, fused multiply-add or not. The encoder refuses
    chunks where that exactness would fail: values or ranges beyond about 2e6 * tolerance,
    i.e. a tolerance near float32 resolution.

    Tolerance: absolute by default (one step for every channel). With ``relative=True`` the
    tolerance is a fraction of each channel's spread: channel c gets ``tolerance * scale_c`` and
    its own :func:`exact_step`, so the proof above holds channel by channel. ``channel_scale``
    (C,) is measured by :func:`channel_std` on the first batch :meth:`quantize` sees unless it is
    given; :attr:`channel_tolerance` is then the absolute bound per channel, which
    :attr:`options` records. A relative codec checks its per-channel bound itself (a chunk beyond
    the proof is measured, and refused if it breaks the bound); ``bounded`` is False for it,
    because no single number bounds all channels.

    Lossless stage (``coding``): ``zstd`` (default) splits codes into byte planes
    (:func:`byte_planes`) and zstd-compresses them (cache format 2); ``rans`` codes each code
    from its causal neighbours with context-modelled rANS (:mod:`freezecache.rans`), tables
    fitted on the first batch and kept in :attr:`options`: 20-45% smaller, but it encodes at
    about half and decodes at about a quarter of zstd's speed. The decoder reads either,
    whatever ``coding`` says.

    :meth:`quantize` does the arithmetic for many chunks at once in torch (any device, all
    cores), and :meth:`compress` the lossless part (thread-safe, releases the GIL), so the cache
    writer can run it in threads while torch quantises the next batch.
    """

    name = "quant"
    bounded = True

    def __init__(
        self,
        tolerance: float,
        zstd_level: int = 1,
        channel_axis: int | None = None,
        *,
        coding: str = "zstd",
        relative: bool = False,
        channel_scale: list[float] | np.ndarray | None = None,
        tables: str | None = None,
    ) -> None:
        if not 1 <= zstd_level <= 22:
            raise FreezecacheError(
                f"codec quant: zstd_level {zstd_level} is out of range — use 1 to 3 for speed"
            )
        if coding not in CODINGS:
            raise FreezecacheError(
                f"codec quant: coding {coding!r} is unknown — use one of {', '.join(CODINGS)}"
            )
        if channel_scale is not None and not relative:
            raise FreezecacheError(
                "codec quant: channel_scale needs relative: true — drop it or set relative"
            )
        self.tolerance = tolerance
        self.zstd_level = zstd_level
        self.channel_axis = channel_axis
        self.coding = coding
        self.relative = relative
        self.bounded = not relative
        self.step, self.grain = exact_step(tolerance)  # the absolute mode's step
        self.channel_scale: np.ndarray | None = None
        if channel_scale is not None:
            self._set_scale(np.asarray(channel_scale, np.float64))
        self._tables_key = tables
        if tables is not None:
            _tables(tables)  # fail early on malformed tables

    # -- tolerance ---------------------------------------------------------------------------
    def _set_scale(self, scale: np.ndarray) -> None:
        """Fix the per-channel spread (floored, see _SCALE_FLOOR) and the steps it implies."""
        if scale.ndim != 1 or not np.isfinite(scale).all() or (scale < 0).any():
            raise FreezecacheError(
                f"codec quant: channel_scale must be finite, >= 0 and one per channel, got "
                f"shape {scale.shape} — measure it with channel_std"
            )
        top = float(scale.max(initial=0.0))
        # All-zero features have no spread to be relative to: the tolerance is then absolute.
        self.channel_scale = np.maximum(scale, _SCALE_FLOOR * top) if top > 0 else scale + 1.0
        if self.channel_tolerance.min(initial=1.0) < 1e-30:  # exact_step's grain would underflow
            raise FreezecacheError(
                f"quant relative tolerance {self.tolerance:g} gives channel tolerances down to "
                f"{self.channel_tolerance.min():g}: the features have almost no spread — use an "
                "absolute tolerance"
            )
        steps = [exact_step(t) for t in self.channel_tolerance]
        self._steps = np.array([s for s, _ in steps])
        self._grains = np.array([g for _, g in steps])

    def calibrate(self, x: np.ndarray | torch.Tensor) -> None:
        """Measure ``channel_scale`` on samples ``x`` (n, *sample_shape) (relative mode only)."""
        if self.relative and self.channel_scale is None:
            x = torch.as_tensor(x)  # samples (n, *sample_shape): laid out like one chunk
            self._set_scale(channel_std(x, _channel_axis(x.ndim, self.channel_axis)))

    @property
    def channel_tolerance(self) -> np.ndarray | None:
        """Absolute error bound per channel (relative mode, once calibrated); None otherwise."""
        if self.channel_scale is None:
            return None
        return self.tolerance * self.channel_scale

    @property
    def max_bound(self) -> float:
        """The largest absolute error any channel may have: ``tolerance`` when absolute."""
        bounds = self.channel_tolerance
        return self.tolerance if bounds is None else float(bounds.max())

    def steps(self, channels: int) -> np.ndarray | float:
        """Decoding step: a float (absolute) or float32 steps (C,) for ``channels`` channels."""
        if not self.relative:
            return self.step
        if self.channel_scale is None or len(self.channel_scale) != channels:
            have = None if self.channel_scale is None else len(self.channel_scale)
            raise FreezecacheError(
                f"codec quant: relative tolerance has channel_scale for {have} channels, the data "
                f"has {channels} — rebuild the cache"
            )
        return self._steps.astype(np.float32)

    def step_for(self, shape: tuple[int, ...]) -> np.ndarray | float:
        """Steps broadcasting like ``lo`` (:meth:`lo_shape`) against chunks of ``shape``."""
        axis = _channel_axis(len(shape), self.channel_axis)
        step = self.steps(shape[axis])
        return step if isinstance(step, float) else step.reshape(self.lo_shape(shape))

    @property
    def options(self) -> dict:
        """Keyword options that rebuild this codec (its calibration included)."""
        opts = {"zstd_level": self.zstd_level, "channel_axis": self.channel_axis}
        if self.coding != "zstd" or self.relative:  # format-2 caches keep their options
            opts.update(coding=self.coding, relative=self.relative, tables=self._tables_key)
            if self.channel_scale is not None:
                opts["channel_scale"] = [float(s) for s in self.channel_scale]
        return opts

    def lo_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``lo``: keepdims over every axis but the channel axis, e.g. (1, C, 1, 1)."""
        axis = _channel_axis(len(shape), self.channel_axis)
        return tuple(n if i == axis else 1 for i, n in enumerate(shape))

    # -- encoding ----------------------------------------------------------------------------
    def _grid(self, x: torch.Tensor, axis: int, channels: list[int] | None):
        """(step, grain, tolerance) per channel as float64 arrays (C,), or floats (absolute)."""
        if not self.relative:
            return self.step, self.grain, self.tolerance
        if self.channel_scale is None:
            if channels is not None:
                raise FreezecacheError(
                    "codec quant: a relative codec must see whole features before a channel "
                    "subset — quantise x before its extra data"
                )
            self._set_scale(channel_std(x, axis))
        idx = slice(None) if channels is None else list(channels)
        if channels is None and x.shape[axis] != len(self.channel_scale):
            self.steps(x.shape[axis])  # raises the user-facing error
        bounds = self.channel_tolerance
        return self._steps[idx], self._grains[idx], bounds[idx]

    def quantize(
        self, chunks: np.ndarray | torch.Tensor, channels: list[int] | None = None
    ) -> Quantized:
        """Quantise equal chunks ``(m, k, *sample_shape)`` at once; returns uncompressed blobs.

        ``channels``: the codec's channels the data holds when it holds a subset (e.g. stored
        flipped channels); their steps then travel in each blob. Only relative codecs need it.
        """
        x = torch.as_tensor(chunks)
        if x.dtype != torch.float32:
            x = x.float()
        axis = 1 + _channel_axis(x.ndim - 1, self.channel_axis)
        step, grain, tol = self._grid(x, axis, channels)
        dims = tuple(i for i in range(1, x.ndim) if i != axis)
        if isinstance(step, float):
            lo = x.amin(dim=dims, keepdim=True).mul_(1.0 / grain).floor_().mul_(grain)
            q = (x - lo).mul_(1.0 / step).round_()
        else:
            shape = [1] * x.ndim
            shape[axis] = -1
            as_t = lambda v: torch.as_tensor(v, dtype=torch.float32, device=x.device).view(shape)  # noqa: E731
            lo = x.amin(dim=dims, keepdim=True).mul_(as_t(1.0 / grain)).floor_().mul_(as_t(grain))
            q = (x - lo).mul_(as_t(1.0 / step)).round_()
        peaks = q.amax(dim=dims)  # (m, C)
        # NaN and Inf reach lo or the codes (amin/amax propagate NaN): no separate pass needed.
        if not (bool(torch.isfinite(peaks).all()) and bool(torch.isfinite(lo).all())):
            check_finite(np.array([np.nan]))  # raises the user-facing error
        peak_codes = peaks.cpu().numpy().astype(np.int64)
        per_channel = np.broadcast_to(np.asarray(step) / 2, peak_codes.shape).astype(np.float64)
        # Beyond the float32 proof (see _F32_SAFE_RANGE): float64 codes and a measured error.
        wide = np.flatnonzero((peak_codes * step > _F32_SAFE_RANGE * np.asarray(tol)).any(axis=1))
        if wide.size:
            self._requantize(x, lo, q, wide, axis, dims, step, peak_codes, per_channel)
            if self.relative and (per_channel[wide] > tol).any():
                raise FreezecacheError(
                    f"quant relative tolerance {self.tolerance:g} broke a channel's bound "
                    "(float32 rounding on a wide chunk) — raise the tolerance or use zfp"
                )
        lo_cpu = lo.reshape(len(peak_codes), -1).cpu().numpy()
        self._check_exact(lo_cpu, peak_codes, step, grain)
        max_codes = peak_codes.max(axis=1, initial=0)
        widths = [_code_width(int(c)) for c in max_codes]
        planes = byte_planes(q, max(widths)).cpu().numpy()
        if self.coding == "rans" and self._tables_key is None:
            self._fit_tables(q, planes, max(widths))
        steps = None if channels is None or not self.relative else np.asarray(step, np.float32)
        pack = self._payload_rans if self.coding == "rans" else self._payload_zstd
        payloads = [
            pack(lo_cpu[i], planes[i, :width], width, steps, x.shape[1:])
            for i, width in enumerate(widths)
        ]
        return Quantized(payloads, per_channel.max(axis=1).tolist(), widths, per_channel)

    def _requantize(self, x, lo, q, wide, axis, dims, step, peak_codes, per_channel) -> None:
        """Chunks ``wide`` again in float64, in place; their measured error per channel."""
        idx = torch.as_tensor(wide, device=x.device)
        x64, lo64 = x[idx].double(), lo[idx].double()
        shape = [1] * x.ndim
        shape[axis] = -1
        step_t = torch.as_tensor(np.asarray(step, np.float64), device=x.device)
        step_t = step_t.view(shape) if step_t.ndim else step_t
        q64 = torch.round((x64 - lo64) / step_t)
        q[idx] = q64.float()
        decoded = q64.float() * step_t.float() + lo[idx]  # the decoder's float32 arithmetic
        err = (x64 - decoded.double()).abs().amax(dim=dims)
        peak_codes[wide] = q64.amax(dim=dims).cpu().numpy().astype(np.int64)
        per_channel[wide] = err.cpu().numpy()

    def _check_exact(self, lo: np.ndarray, max_codes: np.ndarray, step, grain) -> None:
        """Refuse chunks whose decode would round in float32 (see the class docstring)."""
        step, grain = np.asarray(step, np.float64), np.asarray(grain, np.float64)
        peak = np.abs(lo).astype(np.float64) + max_codes * step + step
        if (max_codes * (step / grain) >= _EXACT).any() or (peak / grain >= _EXACT).any():
            raise FreezecacheError(
                f"quant tolerance {self.tolerance:g} is too fine for activations up to "
                f"{peak.max():g} (float32 cannot hold them on that grid) — raise the tolerance "
                "or use zfp"
            )

    def _fit_tables(self, q: torch.Tensor, planes: np.ndarray, width: int) -> None:
        """Fit the rANS tables on the first batch's codes (at most about 4M of them)."""
        m = max(1, min(q.shape[0], (1 << 22) // max(1, q[0].numel())))
        codes = planes[:m, 0] if width == 1 else join_planes(torch.from_numpy(planes[:m])).numpy()
        freq = rans.fit_tables(codes.reshape(m * q.shape[1], *q.shape[2:]))
        packed = _zstd_compressor(19).compress(freq.tobytes())
        self._tables_key = f"{freq.shape[1]}:{base64.b64encode(packed).decode()}"

    def _payload_zstd(self, lo, planes, width, steps, _shape) -> bytes:
        """Format-2 payload (absolute, all channels) or FCR2 (relative)."""
        if not self.relative:
            head = _QUANT_HEADER.pack(_QUANT_MAGIC, width, lo.shape[0])
            return b"".join((head, lo.tobytes(), planes.tobytes()))
        flags = 0 if steps is None else _FLAG_STEPS
        head = _REL_HEADER.pack(_REL_MAGIC, width, flags, lo.shape[0])
        extra = b"" if steps is None else steps.tobytes()
        return b"".join((head, extra, lo.tobytes(), planes.tobytes()))

    def _payload_rans(self, lo, planes, width, steps, shape) -> bytes:
        """Codes, shape and what the blob header needs, for :meth:`compress` to rANS-code."""
        flags = (0 if steps is None else _FLAG_STEPS) | (0 if lo.any() else _FLAG_LO_ZERO)
        head = _RANS_HEADER.pack(_PAYLOAD_MAGIC, flags, width, 0, 0, lo.shape[0])
        dims = _PAYLOAD_DIMS.pack(len(shape)) + np.asarray(shape, np.int64).tobytes()
        parts = [head, dims, b"" if steps is None else steps.tobytes()]
        parts += [b"" if flags & _FLAG_LO_ZERO else lo.tobytes(), planes.tobytes()]
        return b"".join(parts)

    def compress(self, payload: bytes) -> bytes:
        """Lossless stage of encoding (thread-safe; releases the GIL)."""
        if payload[:4] != _PAYLOAD_MAGIC:
            return _zstd_compressor(self.zstd_level).compress(payload)
        _, flags, width, _, _, channels = _RANS_HEADER.unpack_from(payload)
        offset = _RANS_HEADER.size
        (ndim,) = _PAYLOAD_DIMS.unpack_from(payload, offset)
        shape = tuple(np.frombuffer(payload, np.int64, ndim, offset + 1).tolist())
        offset += 1 + 8 * ndim
        meta_end = offset + 4 * channels * (bool(flags & _FLAG_STEPS) + (not flags & _FLAG_LO_ZERO))
        planes = np.frombuffer(payload, np.uint8, offset=meta_end).reshape(width, -1)
        codes = planes[0] if width == 1 else join_planes(torch.from_numpy(planes[None].copy()))[0]
        words, escapes, lane_words, lane_escapes = _tables(self._tables_key).encode(
            np.asarray(codes).reshape(shape)
        )
        lanes = len(lane_words)
        head = _RANS_HEADER.pack(_RANS_MAGIC, flags, width, lanes, 0, channels)
        counts = np.concatenate([lane_words, lane_escapes]).astype(np.uint32)
        pad = b"\0\0" if len(words) % 2 else b""  # keeps the escapes 4-byte aligned
        parts = (head, counts.tobytes(), payload[offset:meta_end], words.tobytes(), pad)
        return b"".join((*parts, escapes.tobytes()))

    def encode(self, x: np.ndarray) -> bytes:
        """Quantise one chunk, then its lossless stage."""
        return self.compress(self.quantize(_as_f32(x)[None]).payloads[0])

    # -- decoding ----------------------------------------------------------------------------
    def unpack(self, buf: bytes, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Lossless part of decoding: byte planes (width, numel) uint8 and ``lo`` (float32).

        ``lo`` has the keepdims shape :meth:`lo_shape` so that ``q * step + lo`` broadcasts,
        with the steps of :meth:`step_for`.
        """
        planes, lo, _ = self._unpack(buf, shape)
        return planes, lo

    def _unpack(self, buf: bytes, shape: tuple[int, ...]):
        """(planes, lo, steps): steps from the blob when it carries them, else the codec's."""
        if bytes(buf[:4]) == _RANS_MAGIC:
            return self._unpack_rans(buf, shape)
        payload = _zstd_decompressor().decompress(buf)
        magic = payload[:4]
        if magic == _QUANT_MAGIC:
            _, width, channels = _QUANT_HEADER.unpack_from(payload)
            offset, flags = _QUANT_HEADER.size, 0
        elif magic == _REL_MAGIC:
            _, width, flags, channels = _REL_HEADER.unpack_from(payload)
            offset = _REL_HEADER.size
        else:
            raise FreezecacheError("quant blob has a bad header — the cache is corrupt; rebuild it")
        steps, offset = self._read_steps(payload, offset, flags, channels, shape)
        lo = np.frombuffer(payload, np.float32, channels, offset).reshape(self.lo_shape(shape))
        planes = np.frombuffer(payload, np.uint8, offset=offset + 4 * channels)
        return planes.reshape(width, -1), lo, steps

    def _read_steps(self, buf, offset: int, flags: int, channels: int, shape):
        """Steps stored in a blob (a channel subset), else the codec's; and the next offset."""
        if flags & _FLAG_STEPS:
            steps = np.frombuffer(buf, np.float32, channels, offset)
            return steps.reshape(self.lo_shape(shape)), offset + 4 * channels
        return self.step_for(shape), offset

    def _unpack_rans(self, buf: bytes, shape: tuple[int, ...]):
        """(planes, lo, steps) of an FCQ3 blob."""
        try:
            return self._parse_rans(buf, shape)
        except (ValueError, struct.error):
            raise FreezecacheError(
                "quant blob is truncated — the cache is corrupt; rebuild it"
            ) from None

    def _parse_rans(self, buf: bytes, shape: tuple[int, ...]):
        """:meth:`_unpack_rans` without the error translation."""
        _, flags, width, lanes, _, channels = _RANS_HEADER.unpack_from(buf)
        offset = _RANS_HEADER.size
        counts = np.frombuffer(buf, np.uint32, 2 * lanes, offset).astype(np.int64)
        steps, offset = self._read_steps(buf, offset + 8 * lanes, flags, channels, shape)
        if flags & _FLAG_LO_ZERO:
            lo = np.zeros(self.lo_shape(shape), np.float32)
        else:
            lo = np.frombuffer(buf, np.float32, channels, offset).reshape(self.lo_shape(shape))
            offset += 4 * channels
        n_words, n_escapes = int(counts[:lanes].sum()), int(counts[lanes:].sum())
        words = np.frombuffer(buf, np.uint16, n_words, offset)
        offset += 2 * n_words + 2 * (n_words % 2)
        escapes = np.frombuffer(buf, np.uint32, n_escapes, offset)
        if self._tables_key is None:
            raise FreezecacheError(
                "quant rANS blob but the codec has no tables — the cache attributes are corrupt"
            )
        planes = np.empty((width, math.prod(shape)), np.uint8)
        ok = _tables(self._tables_key).decode_into(
            words, escapes, counts[:lanes], counts[lanes:], shape, planes
        )
        if not ok:
            raise FreezecacheError("quant blob is truncated — the cache is corrupt; rebuild it")
        return planes, lo, steps

    def decode(self, buf: bytes, shape: tuple[int, ...]) -> np.ndarray:
        """Full decode on CPU (same arithmetic as :func:`dequantize`)."""
        planes, lo, step = self._unpack(buf, shape)
        q = planes[0].astype(np.int32)
        for j in range(1, planes.shape[0]):
            q |= planes[j].astype(np.int32) << (8 * j)
        return _dequantize_np(q.reshape(shape), lo, step)


def dequantize(
    planes: torch.Tensor, lo: torch.Tensor, step: float | torch.Tensor, shape: tuple[int, ...]
) -> torch.Tensor:
    """Device part of quant decoding: join the byte planes, then ``q * step + lo`` in float32.

    ``planes`` is uint8 ``(B, width, numel)`` (one sample per row); ``lo`` broadcasts against
    ``(B, *shape)`` per channel, e.g. (B, C, 1, 1) for maps or (B, 1, D) for tokens, and so does
    ``step`` when it is a float32 tensor of per-channel steps (relative tolerance,
    :meth:`QuantCodec.step_for`). Both float32 ops are exact for the codes :class:`QuantCodec`
    writes, so the result equals the CPU decode bit for bit on any device.
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
