"""The fused decode + augment kernel of :mod:`freezecache.cache.fused`, compiled by numba.

Its own module, imported only when the kernel runs (numba is optional and slow to import), so
that both functions are module globals: numba's on-disk cache (``cache=True``) cannot key a
function that captures another compiled function in a closure, so a kernel defined inside a
function was compiled again, for seconds, in every process that used it (numba issue 6264).
Here a new process loads the compiled kernel from ``__pycache__`` (a test checks the cache hit).
"""

import numba
import numpy as np


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
