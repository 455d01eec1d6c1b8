"""``quant``: uniform quantisation per chunk and channel with a proved bound, then a lossless
stage (:mod:`.quant_blob`).

The step is 2 * tolerance * (1 - 1e-3) cut to 4 significant bits, which makes the float32
decode exact (:func:`.planes.exact_step`). The tolerance is absolute, or with ``relative=True``
a fraction of each channel's standard deviation measured on the first batch (one exact step per
channel). The lossless stage is zstd on byte planes (``coding="zstd"``, default) or
context-modelled rANS (``coding="rans"``, :mod:`.rans`: 20-45% smaller, 2-4x slower; see
benchmarks/bench_coding.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from freezecache.codecs import CODINGS, quant_blob
from freezecache.codecs.base import as_f32, check_finite
from freezecache.codecs.planes import (
    byte_planes,
    channel_axis,
    channel_std,
    code_width,
    dequantize_np,
    exact_step,
)
from freezecache.core.errors import FreezecacheError

# float32 holds every integer multiple of a power of two up to 2^24 of them exactly.
_EXACT = 2**24

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


# Relative tolerance: a channel whose spread is below this share of the widest channel's counts
# as that spread (a dead channel would otherwise get a zero tolerance).
_SCALE_FLOOR = 1e-3


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
                f"codec quant: coding {coding!r} is unknown — use one of "
                f"{', '.join(sorted(CODINGS))}"
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
            quant_blob.tables(tables)  # fail early on malformed tables

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
            self._set_scale(channel_std(x, channel_axis(x.ndim, self.channel_axis)))

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
        axis = channel_axis(len(shape), self.channel_axis)
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
        axis = channel_axis(len(shape), self.channel_axis)
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
        axis = 1 + channel_axis(x.ndim - 1, self.channel_axis)
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
        widths = [code_width(int(c)) for c in max_codes]
        planes = byte_planes(q, max(widths)).cpu().numpy()
        if self.coding == "rans" and self._tables_key is None:
            self._tables_key = quant_blob.fit_tables(q, planes, max(widths))
        steps = None if channels is None or not self.relative else np.asarray(step, np.float32)
        pack = self._pack
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

    def _pack(self, lo, planes, width, steps, shape) -> bytes:
        """A chunk's payload before the lossless stage, in this codec's coding."""
        if self.coding == "rans":
            return quant_blob.pack_rans(lo, planes, width, steps, shape)
        return quant_blob.pack_zstd(lo, planes, width, steps, self.relative)

    # -- the lossless stage --------------------------------------------------------------------
    def compress(self, payload: bytes) -> bytes:
        """Lossless stage of encoding (thread-safe; releases the GIL)."""
        return quant_blob.compress(payload, self.zstd_level, self._tables_key)

    def encode(self, x: np.ndarray) -> bytes:
        """Quantise one chunk, then its lossless stage."""
        return self.compress(self.quantize(as_f32(x)[None]).payloads[0])

    # -- decoding ----------------------------------------------------------------------------
    def unpack(self, buf: bytes, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Lossless part of decoding: byte planes (width, numel) uint8 and ``lo`` (float32).

        ``lo`` has the keepdims shape :meth:`lo_shape` so that ``q * step + lo`` broadcasts,
        with the steps of :meth:`step_for`.
        """
        planes, lo, _ = self.unpack_steps(buf, shape)
        return planes, lo

    def unpack_steps(self, buf: bytes, shape: tuple[int, ...]):
        """(planes, lo, steps): steps from the blob when it carries them, else the codec's."""
        return quant_blob.unpack(
            buf, shape, self.lo_shape(shape), lambda: self.step_for(shape), self._tables_key
        )

    def decode(self, buf: bytes, shape: tuple[int, ...]) -> np.ndarray:
        """Full decode on CPU (same arithmetic as :func:`.planes.dequantize`)."""
        planes, lo, step = self.unpack_steps(buf, shape)
        q = planes[0].astype(np.int32)
        for j in range(1, planes.shape[0]):
            q |= planes[j].astype(np.int32) << (8 * j)
        return dequantize_np(q.reshape(shape), lo, step)
