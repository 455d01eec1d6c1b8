"""Context-modelled rANS for quantisation codes: the lossless stage of the ``quant`` codec.

Codes are coded plane by plane in raster order (a plane is one channel of one sample for maps
``(k, C, H, W)``, one sample's ``(N, D)`` token grid for tokens). Each code ``q`` is predicted
from its causal neighbours (left ``a``, up ``b``, up-left ``c``) by the median edge detector of
LOCO-I / JPEG-LS, and the zigzagged residual is coded with a static frequency table chosen by
a context: the local activity ``|a-c| + |b-c| + |a-b|`` (10 log buckets) and the prediction
itself (0..7, so that ReLU zeros and small values get their own tables). On ResNet-20 features
this takes about 2.4 bits per value where zstd on bytes takes 3.5 (benchmarks/bench_coding.py).

Tables are static per cache: :func:`fit_tables` builds them from the first codes the codec
sees. A residual that the table of its context does not hold (frequency 0) is coded as the
escape symbol and stored raw, so every input round-trips whatever the tables.

rANS follows Giesen's ``rans_byte`` with a 32-bit state and 16-bit words: the encoder runs
backwards over the symbols, the decoder forwards, one symbol per lookup-table slot.
"""

from __future__ import annotations

import numba
import numpy as np

PROB_BITS = 12
PROB_SCALE = 1 << PROB_BITS
_STATE_LOW = 1 << 16  # the state stays in [2^16, 2^32) between symbols
N_ACT = 10
N_PRED = 8
N_CTX = N_ACT * N_PRED
MAX_ALPHABET = 256  # residual symbols including the escape (the last one)
LANES = 4  # planes decoded in lockstep


def _activity_buckets() -> np.ndarray:
    """Activity -> bucket: floor(2 log2(act + 1)) capped at N_ACT - 1, for act < 1024."""
    act = np.arange(1024, dtype=np.float64)
    return np.minimum(np.floor(2 * np.log2(act + 1)), N_ACT - 1).astype(np.int32)


_ACT_LUT = _activity_buckets()


@numba.njit(inline="always")
def _context(a: int, b: int, c: int, act_lut: np.ndarray) -> tuple[int, int]:
    """(prediction, context) of a code from its left, up and up-left neighbours."""
    lo, hi = min(a, b), max(a, b)
    pred = max(lo, min(hi, a + b - c))  # the median of a, b and a + b - c: branch-free
    act = abs(a - c) + abs(b - c) + (hi - lo)
    bucket = act_lut[min(act, 1023)]
    return pred, bucket * N_PRED + min(pred, N_PRED - 1)


@numba.njit(nogil=True, cache=True)
def _contexts_and_symbols(q: np.ndarray, act_lut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Context and zigzagged residual of every code of ``q`` (P, H, W), for fitting tables."""
    planes, h, w = q.shape
    ctx = np.empty(q.size, np.int32)
    sym = np.empty(q.size, np.int64)
    n = 0
    for p in range(planes):
        for i in range(h):
            for j in range(w):
                a = q[p, i, j - 1] if j > 0 else 0
                b = q[p, i - 1, j] if i > 0 else 0
                c = q[p, i - 1, j - 1] if i > 0 and j > 0 else 0
                pred, k = _context(a, b, c, act_lut)
                ctx[n] = k
                r = q[p, i, j] - pred
                sym[n] = 2 * r if r >= 0 else -2 * r - 1
                n += 1
    return ctx, sym


@numba.njit(nogil=True, cache=True)
def _encode(
    q: np.ndarray, lanes: int, freq: np.ndarray, cum: np.ndarray, act_lut: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """rANS-code the planes of ``q`` (P, H, W); plane p goes to lane p % lanes.

    Returns the words (uint16) and escaped residuals (uint32) of all lanes back to back, in
    decoding order, and the number of each per lane.
    """
    planes, h, w = q.shape
    escape = freq.shape[1] - 1
    words = np.empty(2 * q.size + 2 * lanes, np.uint16)  # worst case: 16 bits per symbol
    escapes = np.empty(q.size, np.uint32)
    lane_words = np.zeros(lanes, np.int64)
    lane_escapes = np.zeros(lanes, np.int64)
    w_end, e_start = 0, 0
    for lane in range(lanes):
        pos = words.size  # a lane is written backwards at the end of ``words``, then moved
        n_esc = 0
        x = _STATE_LOW  # int64 arithmetic: the state stays below 2^32
        last = lane + ((planes - 1 - lane) // lanes) * lanes
        for p in range(last, -1, -lanes):
            for i in range(h - 1, -1, -1):
                for j in range(w - 1, -1, -1):
                    a = q[p, i, j - 1] if j > 0 else 0
                    b = q[p, i - 1, j] if i > 0 else 0
                    c = q[p, i - 1, j - 1] if i > 0 and j > 0 else 0
                    pred, ctx = _context(a, b, c, act_lut)
                    r = q[p, i, j] - pred
                    z = 2 * r if r >= 0 else -2 * r - 1
                    s = z if z < escape and freq[ctx, z] > 0 else escape
                    if s == escape:
                        escapes[e_start + n_esc] = z
                        n_esc += 1
                    f = np.int64(freq[ctx, s])
                    x_max = ((_STATE_LOW >> PROB_BITS) << 16) * f
                    while x >= x_max:
                        pos -= 1
                        words[pos] = x & 0xFFFF
                        x >>= 16
                    x = ((x // f) << PROB_BITS) + (x % f) + np.int64(cum[ctx, s])
        pos -= 2
        words[pos] = x >> 16
        words[pos + 1] = x & 0xFFFF
        n = words.size - pos
        words[w_end : w_end + n] = words[pos:]  # never overlaps: w_end + n <= pos
        escapes[e_start : e_start + n_esc] = escapes[e_start : e_start + n_esc][::-1].copy()
        lane_words[lane], lane_escapes[lane] = n, n_esc
        w_end += n
        e_start += n_esc
    return words[:w_end].copy(), escapes[:e_start].copy(), lane_words, lane_escapes


@numba.njit(inline="always")
def _symbol(x, ctx, pos, esc, packed, words, last_word, escapes, escape):
    """One decoding step of a lane: (state, word position, escape position, residual)."""
    e = packed[ctx, x & (PROB_SCALE - 1)]
    s = np.int64(e & 0xFF)
    x = (np.int64((e >> 8) & 0xFFF) + 1) * (x >> PROB_BITS) + np.int64(e >> 20)
    # One 16-bit word at most per symbol (12-bit probabilities), read without a branch; the
    # index is clamped, so a corrupt blob cannot read out of bounds.
    need = np.int64(x < _STATE_LOW)
    x = (x << (16 * need)) | (np.int64(words[min(pos, last_word)]) & -need)
    # Escapes without a branch too (a branch here makes the loop three times slower): the
    # escape list is never empty (see Tables.decode_into), and an index past its end is
    # caught by the final count check.
    is_escape = np.int64(s == escape)
    s += is_escape * (np.int64(escapes[min(esc, escapes.size - 1)]) - s)
    return x, pos + need, esc + is_escape, (s >> 1) ^ -(s & 1)


@numba.njit(nogil=True, cache=True)
def _decode(
    words: np.ndarray,
    escapes: np.ndarray,
    lane_words: np.ndarray,
    lane_escapes: np.ndarray,
    shape: tuple[int, int, int],
    packed: np.ndarray,
    escape: int,
    act_lut: np.ndarray,
    out: np.ndarray,
) -> bool:
    """Inverse of :func:`_encode`: codes into ``out`` (width, P * H * W) little-endian byte planes.

    With four lanes, planes 4g..4g+3 are decoded in lockstep so that the lanes' dependency
    chains overlap (about twice as fast as one lane); the planes of a last, partial group and
    blobs with fewer lanes go one lane at a time. Returns False for a corrupt stream.
    """
    planes, h, w = shape
    lanes = lane_words.size
    last_word = max(words.size - 1, 0)
    x = np.zeros(4, np.int64)
    pos = np.zeros(4, np.int64)
    esc = np.zeros(4, np.int64)
    w0, e0 = 0, 0
    for lane in range(lanes):
        if lane_words[lane] < 2 or w0 + 2 > words.size:
            return False
        x[lane] = (np.int64(words[w0]) << 16) | np.int64(words[w0 + 1])
        pos[lane], esc[lane] = w0 + 2, e0
        w0 += lane_words[lane]
        e0 += lane_escapes[lane]
    ok = w0 == words.size and e0 <= escapes.size
    rows = np.zeros((2, 4, w + 1), np.int64)  # previous and current row per lane; column 0 = 0
    size = h * w
    full = planes // 4 * 4 if lanes == 4 and out.shape[0] == 1 else 0  # lockstep part
    x0, x1, x2, x3 = x[0], x[1], x[2], x[3]
    p0, p1, p2, p3 = pos[0], pos[1], pos[2], pos[3]
    e0, e1, e2, e3 = esc[0], esc[1], esc[2], esc[3]
    for first in range(0, full, 4):
        rows[:] = 0
        for i in range(h):
            prev, cur = rows[(i + 1) % 2], rows[i % 2]
            base = first * size + i * w
            for j in range(w):
                pr, ctx = _context(cur[0, j], prev[0, j + 1], prev[0, j], act_lut)
                x0, p0, e0, r = _symbol(x0, ctx, p0, e0, packed, words, last_word, escapes, escape)
                cur[0, j + 1] = v = pr + r
                out[0, base + j] = v & 0xFF
                pr, ctx = _context(cur[1, j], prev[1, j + 1], prev[1, j], act_lut)
                x1, p1, e1, r = _symbol(x1, ctx, p1, e1, packed, words, last_word, escapes, escape)
                cur[1, j + 1] = v = pr + r
                out[0, base + size + j] = v & 0xFF
                pr, ctx = _context(cur[2, j], prev[2, j + 1], prev[2, j], act_lut)
                x2, p2, e2, r = _symbol(x2, ctx, p2, e2, packed, words, last_word, escapes, escape)
                cur[2, j + 1] = v = pr + r
                out[0, base + 2 * size + j] = v & 0xFF
                pr, ctx = _context(cur[3, j], prev[3, j + 1], prev[3, j], act_lut)
                x3, p3, e3, r = _symbol(x3, ctx, p3, e3, packed, words, last_word, escapes, escape)
                cur[3, j + 1] = v = pr + r
                out[0, base + 3 * size + j] = v & 0xFF
    x[0], x[1], x[2], x[3] = x0, x1, x2, x3
    pos[0], pos[1], pos[2], pos[3] = p0, p1, p2, p3
    esc[0], esc[1], esc[2], esc[3] = e0, e1, e2, e3
    width = out.shape[0]
    for p in range(full, planes):
        lane = p % lanes
        xl, pl, el = x[lane], pos[lane], esc[lane]
        rows[:] = 0
        for i in range(h):
            prev, cur = rows[(i + 1) % 2], rows[i % 2]
            for j in range(w):
                pr, ctx = _context(cur[0, j], prev[0, j + 1], prev[0, j], act_lut)
                xl, pl, el, r = _symbol(xl, ctx, pl, el, packed, words, last_word, escapes, escape)
                cur[0, j + 1] = v = pr + r
                n = p * size + i * w + j
                for k in range(width):
                    out[k, n] = (v >> (8 * k)) & 0xFF
        x[lane], pos[lane], esc[lane] = xl, pl, el
    w_end, e_end = 0, 0
    for lane in range(lanes):  # every lane consumed exactly its own words and escapes
        w_end += lane_words[lane]
        e_end += lane_escapes[lane]
        ok = ok and pos[lane] == w_end and esc[lane] == e_end
    return ok


def as_planes(q: np.ndarray) -> np.ndarray:
    """View codes ``(k, ...)`` as coding planes (P, H, W): the last two axes are the raster.

    Maps (k, C, H, W) give k * C planes of H x W; tokens (k, N, D) give k planes of N x D;
    vectors (k, D) give k planes of 1 x D.
    """
    if q.ndim == 2:
        return q.reshape(q.shape[0], 1, q.shape[1])
    return q.reshape(-1, q.shape[-2], q.shape[-1])


def _code_planes(q: np.ndarray) -> np.ndarray:
    """Contiguous (P, H, W) codes for the jitted loops: uint8 and int32 as they are (no copy)."""
    dtype = q.dtype if q.dtype in (np.uint8, np.int32) else np.int64
    return np.ascontiguousarray(as_planes(q), dtype)


def plane_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(P, H, W) of :func:`as_planes` for codes of ``shape``."""
    if len(shape) == 2:
        return shape[0], 1, shape[1]
    return int(np.prod(shape[:-2])), shape[-2], shape[-1]


def fit_tables(q: np.ndarray, alphabet: int | None = None) -> np.ndarray:
    """Static frequencies (N_CTX, alphabet) uint16, each row summing to PROB_SCALE, from codes.

    The last symbol is the escape. A residual gets a nonzero frequency in a context when its
    smoothed probability there is worth at least half a slot; the rest go through the escape.
    Contexts the codes never reach use the overall distribution.
    """
    ctx, sym = _contexts_and_symbols(_code_planes(q), _ACT_LUT)
    if alphabet is None:  # the largest residual seen, with room for a few more, and the escape
        alphabet = int(min(MAX_ALPHABET, max(int(sym.max(initial=0)) * 5 // 4 + 2, 4)))
    sym = np.minimum(sym, alphabet - 1)  # residuals beyond the alphabet count as escapes
    counts = np.bincount(ctx * alphabet + sym, minlength=N_CTX * alphabet)
    counts = counts.reshape(N_CTX, alphabet).astype(np.float64)
    overall = counts.sum(0) + 1.0  # every symbol, the escape included, is possible somewhere
    overall /= overall.sum()
    rows = counts + 2.0 * overall  # two pseudo-samples of the overall distribution
    return np.stack([_normalise(row / row.sum()) for row in rows])


def _normalise(p: np.ndarray) -> np.ndarray:
    """Probabilities -> integer frequencies summing to PROB_SCALE; the escape (last) gets the
    mass of the symbols too rare for one slot, and at least one slot."""
    p = p.copy()
    rare = p[:-1] * PROB_SCALE < 0.5
    p[-1] += p[:-1][rare].sum()
    p[:-1][rare] = 0.0
    scaled = p * PROB_SCALE
    freq = np.floor(scaled).astype(np.int64)
    freq[(freq == 0) & (p > 0)] = 1
    freq[-1] = max(freq[-1], 1)
    short = PROB_SCALE - int(freq.sum())
    order = np.argsort(-(scaled - freq))  # largest remainders first
    while short != 0:  # hand out (or take back) single slots, never below 1 for used symbols
        for s in order:
            if short == 0:
                break
            if short > 0 and p[s] > 0:
                freq[s] += 1
                short -= 1
            elif short < 0 and freq[s] > 1:
                freq[s] -= 1
                short += 1
    return freq.astype(np.uint16)


class Tables:
    """Frequency, cumulative and decoding lookup tables of one fitted model."""

    def __init__(self, freq: np.ndarray) -> None:
        freq = np.ascontiguousarray(freq, np.uint16)
        if freq.ndim != 2 or freq.shape[0] != N_CTX or not 2 <= freq.shape[1] <= MAX_ALPHABET:
            raise ValueError(f"rANS tables must be ({N_CTX}, 2..{MAX_ALPHABET}), got {freq.shape}")
        if not (freq.astype(np.int64).sum(1) == PROB_SCALE).all() or not (freq[:, -1] > 0).all():
            raise ValueError("rANS table rows must sum to PROB_SCALE with a nonzero escape")
        self.freq = freq
        self.cum = np.zeros((N_CTX, freq.shape[1] + 1), np.uint32)
        np.cumsum(freq, axis=1, out=self.cum[:, 1:])
        # Decoding table: per context and slot, the symbol | (frequency - 1) << 8 |
        # (slot - cumulative frequency) << 20, so that one load gives a whole rANS step.
        slots = np.arange(PROB_SCALE, dtype=np.int64)
        self.packed = np.empty((N_CTX, PROB_SCALE), np.uint32)
        for ctx, row in enumerate(freq.astype(np.int64)):
            sym = np.repeat(np.arange(row.size), row)
            self.packed[ctx] = sym | (row[sym] - 1) << 8 | (slots - self.cum[ctx, sym]) << 20

    def encode(self, q: np.ndarray, lanes: int = LANES) -> tuple[np.ndarray, ...]:
        """(words uint16, escapes uint32, words per lane, escapes per lane) of codes ``q``."""
        planes = _code_planes(q)
        return _encode(planes, max(1, min(lanes, planes.shape[0])), self.freq, self.cum, _ACT_LUT)

    def decode_into(
        self,
        words: np.ndarray,
        escapes: np.ndarray,
        lane_words: np.ndarray,
        lane_escapes: np.ndarray,
        shape: tuple[int, ...],
        out: np.ndarray,
    ) -> bool:
        """Decode codes of ``shape`` (k, ...) into byte planes ``out`` (width, numel) uint8.

        False when the stream is too short for ``shape`` (a corrupt blob).
        """
        if escapes.size == 0:  # the decoder reads one escape ahead, see _symbol
            escapes = np.zeros(1, np.uint32)
            lane_escapes = np.zeros_like(lane_escapes)
        return _decode(
            words, escapes, lane_words, lane_escapes, plane_shape(shape),
            self.packed, self.freq.shape[1] - 1, _ACT_LUT, out,
        )  # fmt: skip
