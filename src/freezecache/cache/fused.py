"""Decode and augment a batch of cached NCHW maps in one pass on the CPU.

Reading the codes of a packed batch (:mod:`freezecache.cache.packed`), a byte per value, the
kernel writes each augmented float32 value once: flip (the stored flip-sensitive channels
instead of the flipped ones, "Discard & Aug."), crop with zero padding, dequantisation
``q * step + lo`` and noise from the bank, for every sample in parallel. It computes exactly
what :func:`freezecache.codecs.planes.dequantize` followed by
:func:`freezecache.training.augment.augment_features` compute (a test compares them bit for bit):
those
run on a training device, this runs where the training device is the CPU and torch would make
a float32 copy of the batch per step of the augmentation.

numba is optional: :func:`available` says whether the kernel can run (the torch path then does
the work).
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from freezecache.core.errors import first_line

log = logging.getLogger(__name__)


@functools.cache
def _kernel():
    import numba

    @numba.njit(cache=True, nogil=True, inline="always")
    def row(src, base, stride, width, step, lo, mirror, dx, w_n, bank, nb, scale, out_row):
        """One output row: dequantised codes of source row ``base`` (mirrored for a flipped
        sample), shifted by the crop's ``dx`` with zeros outside, plus noise."""
        w_lo = max(0, -dx)
        w_hi = min(w_n, w_n - dx)
        for w in range(w_n):
            v = np.float32(0.0)
            if w_lo <= w < w_hi:
                ws = w + dx
                p = base + ((w_n - 1 - ws) if mirror else ws)
                if width == 1:
                    q = np.int32(src[p])
                else:
                    q = np.int32(0)
                    for j in range(width):
                        q |= np.int32(src[p + j * stride]) << (8 * j)
                v = np.float32(q) * step + lo
            if scale != 0:
                v = v + scale * bank[nb + w]
            out_row[w] = v

    @numba.njit(parallel=True, cache=True, nogil=True)
    def decode_augment(
        buf, at, stride, width, lo, step,  # the features' codes (see packed.gather)
        e_buf, e_at, e_stride, e_width, e_lo, e_step, slot,  # stored channels; slot[c]: k or -1
        flip, crop, pad, noise_at, bank, scale, out,  # draws (augment.Draws) and the output
    ):  # fmt: skip
        b_n, c_n, h_n, w_n = out.shape
        hw = h_n * w_n
        for b in numba.prange(b_n):
            dy = crop[b, 0] - pad
            dx = crop[b, 1] - pad
            flipped = flip[b]
            for c in range(c_n):
                k = slot[c] if flipped else -1
                for h in range(h_n):
                    hs = h + dy
                    nb = noise_at[b] + c * hw + h * w_n
                    if not 0 <= hs < h_n:  # the crop's zero padding: noise only
                        for w in range(w_n):
                            out[b, c, h, w] = (
                                np.float32(0.0) + scale * bank[nb + w] if scale != 0 else 0.0
                            )
                    elif k >= 0:  # the stored F(flip(x)) channel, already flipped
                        base = e_at[b] + (k * h_n + hs) * w_n
                        row(e_buf, base, e_stride[b], e_width[b], e_step[k], e_lo[b, k], False,
                            dx, w_n, bank, nb, scale, out[b, c, h])  # fmt: skip
                    else:
                        base = at[b] + (c * h_n + hs) * w_n
                        row(buf, base, stride[b], width[b], step[c], lo[b, c], flipped,
                            dx, w_n, bank, nb, scale, out[b, c, h])  # fmt: skip

    return decode_augment


@functools.cache
def available() -> bool:
    """Whether numba is importable here (else the torch path decodes and augments)."""
    try:
        import numba  # noqa: F401
    except Exception as err:  # noqa: BLE001 (missing or broken: the torch path works anyway)
        log.warning(
            "numba is not usable (%s): cached batches decode and augment through torch on the "
            "CPU (slower; pip install numba for the fused pass)", first_line(err)
        )  # fmt: skip
        return False
    return True


def decode_augment(
    x: dict,
    extra: dict | None,
    shape: tuple[int, int, int],
    step: np.ndarray,
    extra_step: np.ndarray | None,
    channels: np.ndarray | None,
    draws,
    pad: int,
    bank: np.ndarray | None,
    scale: float,
) -> np.ndarray:
    """The augmented float32 batch (B, C, H, W) of packed ``x`` (and its stored channels)."""
    b = len(x["at"])
    c_n = shape[0]
    slot = np.full(c_n, -1, np.int64)
    if extra is not None and channels is not None:
        slot[np.asarray(channels, np.int64)] = np.arange(len(channels))
    else:
        extra = {k: np.zeros(b, np.int64) for k in ("at", "stride", "width")}
        extra["buf"] = np.zeros(1, np.uint8)
        extra["lo"], extra_step = np.zeros((b, 1), np.float32), np.zeros(1, np.float32)
    flip = draws.flip.numpy()
    crop = draws.crop.numpy() if draws.crop is not None else np.full((b, 2), pad, np.int64)
    use_noise = draws.noise_at is not None and bank is not None and scale != 0
    noise_at = draws.noise_at.numpy() if use_noise else np.zeros(b, np.int64)
    values = bank if use_noise else np.zeros(1, np.float32)
    out = np.empty((b, *shape), np.float32)
    _kernel()(
        x["buf"], x["at"], x["stride"], x["width"], x["lo"], step,
        extra["buf"], extra["at"], extra["stride"], extra["width"], extra["lo"], extra_step, slot,
        flip, crop, pad, noise_at, values, np.float32(scale if use_noise else 0.0), out,
    )  # fmt: skip
    return out
