"""Codecs keep their error bound, pick sensible layouts, and decode the same on torch."""

import json
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from freezecache.cache.format import Layout, open_cache
from freezecache.cache.loader import make_loader
from freezecache.cache.reader import CacheDataset, finish_batch
from freezecache.cache.writer import Build, CacheWriter
from freezecache.codecs.planes import byte_planes, channel_std, dequantize, exact_step, join_planes
from freezecache.codecs.quant import QuantCodec
from freezecache.codecs.registry import make_codec
from freezecache.core.errors import FreezecacheError

TOLERANCES = (1e-1, 1e-2, 1e-3)
RANS = {"coding": "rans"}


def relu_maps(n: int, c: int = 16, hw: int = 32, seed: int = 0) -> np.ndarray:
    """ReLU-like activations: smooth fields, about 80% zeros, non-negative."""
    g = torch.Generator().manual_seed(seed)
    z = F.avg_pool2d(torch.randn(n, c, hw, hw, generator=g), 5, 1, 2) * 3 - 0.5
    return F.relu(z).numpy()


def normal_data(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def max_error(x: np.ndarray, y: np.ndarray) -> float:
    """Exact max abs difference (float64, so a float32 rounding cannot hide a violation)."""
    return float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max())


@pytest.mark.parametrize("name", ["zfp", "quant"])
@pytest.mark.parametrize("tol", TOLERANCES)
@pytest.mark.parametrize("kind", ["relu", "normal"])
def test_roundtrip_within_tolerance(name, tol, kind):
    x = relu_maps(4) if kind == "relu" else normal_data((4, 16, 32, 32))
    codec = make_codec(name, tol)
    for k in (1, 2):
        chunk = x[:k]
        blob = codec.encode(chunk)
        out = codec.decode(blob, chunk.shape)
        assert out.dtype == np.float32 and out.shape == chunk.shape
        assert 0 < max_error(chunk, out) <= tol
        if kind == "relu":
            assert len(blob) < chunk.nbytes  # zfp k=2 is the worst: about 0.5-0.9


def test_relu_maps_compress_better_at_looser_tolerance():
    x = relu_maps(2)
    for name in ("zfp", "quant"):
        sizes = [len(make_codec(name, tol).encode(x)) for tol in TOLERANCES]
        assert sizes[0] < sizes[1] < sizes[2]


def test_none_float32_is_exact_and_float16_is_fp16_rounding():
    x = normal_data((2, 3, 8, 8)) * 10
    exact = make_codec("none", 1e-2)
    assert not exact.bounded
    assert np.array_equal(exact.decode(exact.encode(x), x.shape), x)
    half = make_codec("none", 1e-2, dtype="float16")
    out = half.decode(half.encode(x), x.shape)
    assert len(half.encode(x)) == x.size * 2
    err = np.abs(out - x)
    assert 0 < err.max() <= np.abs(x).max() * 2.0**-11  # half an fp16 ulp, relative
    with pytest.raises(FreezecacheError, match="float16 range"):
        half.encode(np.full((1, 4), 7e4, np.float32))


@pytest.mark.parametrize("name", ["zfp", "quant", "none"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_refused(name, bad):
    x = normal_data((2, 3, 4, 4))
    x[1, 2, 3, 0] = bad
    with pytest.raises(FreezecacheError, match="NaN/Inf"):
        make_codec(name, 1e-2).encode(x)


def test_make_codec_rejects_bad_input():
    with pytest.raises(FreezecacheError, match="unknown codec 'lz4'"):
        make_codec("lz4", 1e-2)
    with pytest.raises(FreezecacheError, match="tolerance must be > 0"):
        make_codec("quant", 0.0)
    with pytest.raises(FreezecacheError, match="unsupported options"):
        make_codec("zfp", 1e-2, level=3)
    with pytest.raises(FreezecacheError, match="dtype 'int8'"):
        make_codec("none", 1e-2, dtype="int8")


@pytest.mark.parametrize("name", ["zfp", "quant", "none"])
def test_options_rebuild_the_same_codec(name):
    codec = make_codec(name, 1e-2)
    again = make_codec(name, 1e-2, **codec.options)
    x = relu_maps(2, c=4, hw=8)
    assert again.encode(x) == codec.encode(x)


chunks = st.tuples(
    st.integers(1, 3),
    hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=7),
).flatmap(
    lambda ks: hnp.arrays(
        np.float32,
        (ks[0], *ks[1]),
        elements=st.floats(-500, 500, width=32),
    )
)


@settings(max_examples=150, deadline=None)
@given(x=chunks, tol=st.sampled_from([1e-3, 3e-3, 1e-2, 0.07, 0.1, 0.5]))
@pytest.mark.parametrize(("name", "opts"), [("zfp", {}), ("quant", {}), ("quant", RANS)])
def test_error_bound_property(name, opts, x, tol):
    codec = make_codec(name, tol, **opts)
    out = codec.decode(codec.encode(x), x.shape)
    assert out.shape == x.shape
    assert max_error(x, out) <= tol


def test_zfp_per_sample_3d_beats_paper_chunks_of_two():
    x = relu_maps(8)
    for tol in TOLERANCES:
        codec = make_codec("zfp", tol)
        ratio_k1 = sum(len(codec.encode(x[i : i + 1])) for i in range(8)) / x.nbytes
        ratio_k2 = sum(len(codec.encode(x[i : i + 2])) for i in range(0, 8, 2)) / x.nbytes
        # Measured (zfpy 1.0.1, 16x32x32 maps): 0.21 vs 0.52 at 1e-1, 0.39 vs 0.89 at 1e-3.
        assert ratio_k1 < 0.6 * ratio_k2


def test_zfp_layout_per_chunk_size():
    zfpy = pytest.importorskip("zfpy")  # at collection it would stop every codec test
    codec = make_codec("zfp", 1e-2)
    assert zfpy.decompress_numpy(codec.encode(relu_maps(1))).shape == (16, 32, 32)
    assert zfpy.decompress_numpy(codec.encode(relu_maps(2))).shape == (2, 16, 32, 32)
    tokens = normal_data((1, 5, 12))
    assert zfpy.decompress_numpy(codec.encode(tokens)).shape == (5, 12)
    with pytest.raises(FreezecacheError, match="1-4 dimensional"):
        codec.encode(np.zeros((2, 2, 2, 2, 2), np.float32))


@pytest.mark.parametrize(("span", "width"), [(100.0, 1), (2_000.0, 2), (100_000.0, 3)])
def test_quant_picks_the_narrowest_code_width(span, width):
    codec = make_codec("quant", 0.5)  # step 0.9375: span / step codes
    x = np.linspace(0, span, 64, dtype=np.float32).reshape(1, 1, 8, 8)
    blob = codec.encode(x)
    planes, _ = codec.unpack(blob, x.shape)
    assert planes.dtype == np.uint8 and planes.shape == (width, 64)
    assert int(join_planes(torch.from_numpy(planes.copy())[None]).max()) == round(span / codec.step)


@pytest.mark.parametrize("width", [1, 2, 3])
def test_byte_planes_round_trip(width):
    g = torch.Generator().manual_seed(width)
    q = torch.randint(0, 2 ** (8 * width), (3, 2, 5, 7), generator=g).float()
    planes = byte_planes(q, width)
    assert planes.dtype == torch.uint8 and planes.shape == (3, width, 70)
    assert torch.equal(join_planes(planes), q.reshape(3, -1).to(torch.int32))
    # Plane 0 holds the low bytes.
    assert torch.equal(planes[:, 0].to(torch.int32), q.reshape(3, -1).to(torch.int32) % 256)


def test_quantize_many_chunks_equals_one_by_one():
    codec = make_codec("quant", 1e-2)
    x = relu_maps(6, c=4, hw=8)
    x[3] *= 40.0  # one chunk needs two-byte codes
    group = codec.quantize(x.reshape(3, 2, 4, 8, 8))
    assert group.widths == [1, 2, 1]
    for i in range(3):
        alone = codec.encode(x[2 * i : 2 * i + 2])
        assert codec.compress(group.payloads[i]) == alone
        assert group.errors[i] <= 1e-2


def test_quant_byte_planes_compress_two_byte_codes_better():
    # Two-byte codes whose high byte is nearly constant: planes put it in one zstd run.
    codec = make_codec("quant", 1e-2)
    x = relu_maps(1, c=16, hw=16) * 4.0
    planes, lo = codec.unpack(codec.encode(x), x.shape)
    assert planes.shape[0] == 2
    interleaved = np.ascontiguousarray(planes.T).tobytes()
    assert len(codec.encode(x)) < len(codec.compress(lo.tobytes() + interleaved))


def test_quant_lo_is_per_chunk_and_channel():
    codec = make_codec("quant", 1e-2)
    maps = relu_maps(2, c=3, hw=8)
    maps[:, 1] += 100.0  # channel 1 lives far from the others
    _, lo = codec.unpack(codec.encode(maps), maps.shape)
    assert lo.shape == (1, 3, 1, 1)
    assert lo[0, 1, 0, 0] == pytest.approx(100.0, abs=codec.step)
    assert lo[0, 0, 0, 0] == 0.0
    tokens = normal_data((2, 5, 6))
    tokens[..., 4] -= 50.0
    _, lo = codec.unpack(codec.encode(tokens), tokens.shape)
    assert lo.shape == (1, 1, 6)  # tokens: channels are the last axis
    assert lo[0, 0, 4] < -50.0 < lo[0, 0, 3] + 50.0


def test_quant_step_keeps_margin_and_few_bits():
    for tol in (1e-3, 0.013, 0.1, 0.77):
        codec = QuantCodec(tol)
        assert 2 * tol * (1 - 1e-3) * 7 / 8 < codec.step <= 2 * tol * (1 - 1e-3)
        assert (codec.step / codec.grain).is_integer() and codec.step / codec.grain < 16


def test_quant_bound_holds_far_from_zero():
    # Values ~1e4 at tolerance 0.05: a plain float32 multiply-add rounds by ~5e-4 here,
    # more than the 1e-3 margin; the exact grid keeps the bound.
    x = (normal_data((2, 8, 16, 16)) + 1e4).astype(np.float32)
    codec = make_codec("quant", 0.05)
    assert max_error(x, codec.decode(codec.encode(x), x.shape)) <= 0.05


def test_quant_refuses_tolerance_below_float32_resolution():
    x = np.full((1, 1, 4, 4), 5e4, np.float32)
    with pytest.raises(FreezecacheError, match="too fine"):
        make_codec("quant", 1e-4).encode(x)


def _torch_matches_numpy(device: str) -> None:
    codec = make_codec("quant", 1e-3)
    x = normal_data((3, 4, 8, 8)) * 5 + 2
    blob = codec.encode(x)
    planes, lo = codec.unpack(blob, x.shape)  # one chunk of 3 samples: lo shared
    per_sample = torch.from_numpy(planes.reshape(planes.shape[0], 3, -1).transpose(1, 0, 2).copy())
    got = dequantize(
        per_sample.to(device),
        torch.from_numpy(lo.copy()).to(device),
        codec.step,
        x.shape[1:],
    )
    assert got.dtype == torch.float32
    assert torch.equal(got.cpu(), torch.from_numpy(codec.decode(blob, x.shape)))


def test_dequantize_on_torch_equals_numpy_decode():
    _torch_matches_numpy("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dequantize_on_cuda_equals_numpy_decode():
    _torch_matches_numpy("cuda")


# -- relative tolerance ---------------------------------------------------------------------------
def per_channel_error(x: np.ndarray, out: np.ndarray, axis: int) -> np.ndarray:
    """Exact max abs difference per channel (float64)."""
    diff = np.abs(x.astype(np.float64) - out.astype(np.float64))
    return np.moveaxis(diff, axis, 0).reshape(diff.shape[axis], -1).max(axis=1)


relative_chunks = st.tuples(
    st.integers(1, 3),  # k
    st.integers(1, 5),  # channels
    st.integers(1, 9),
    st.integers(1, 9),
    st.floats(0.01, 300.0),  # spread of the data
    st.integers(0, 2**16),
).map(
    lambda t: (
        np.random.default_rng(t[5]).standard_normal((t[0], t[1], t[2], t[3]))
        * np.random.default_rng(t[5] + 1).uniform(0.05, 1.0, (1, t[1], 1, 1))
        * t[4]
    ).astype(np.float32)
)


@settings(max_examples=120, deadline=None)
@given(x=relative_chunks, rel=st.sampled_from([0.01, 0.05, 0.1, 0.25, 0.5, 1.0]))
@pytest.mark.parametrize("coding", ["rans", "zstd"])
def test_relative_error_bound_property(coding, x, rel):
    codec = make_codec("quant", rel, relative=True, coding=coding)
    out = codec.decode(codec.encode(x), x.shape)
    bounds = codec.channel_tolerance
    scale = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1).std(axis=1)
    assert np.allclose(bounds, rel * np.maximum(scale, 1e-3 * scale.max()), rtol=1e-5) or (
        scale.max() == 0
    )
    assert (per_channel_error(x, out, 1) <= bounds).all()
    assert codec.max_bound == pytest.approx(bounds.max())


@settings(max_examples=60, deadline=None)
@given(x=relative_chunks, rel=st.sampled_from([0.02, 0.1, 0.5]))
def test_relative_bound_holds_for_tokens(x, rel):
    # Tokens (k, N, D): channels are the last axis.
    x = np.ascontiguousarray(x.reshape(*x.shape[:2], -1).transpose(0, 2, 1))
    codec = make_codec("quant", rel, relative=True, **RANS)
    out = codec.decode(codec.encode(x), x.shape)
    assert (per_channel_error(x, out, 2) <= codec.channel_tolerance).all()


def test_relative_steps_follow_each_channel():
    x = relu_maps(8, c=4, hw=8)
    x[:, 2] *= 50.0  # one channel 50x wider: its tolerance (and step) 50x larger
    codec = make_codec("quant", 0.1, relative=True)
    q = codec.quantize(x.reshape(4, 2, 4, 8, 8))
    scale = codec.channel_scale
    assert np.allclose(scale, x.transpose(1, 0, 2, 3).reshape(4, -1).std(axis=1), rtol=1e-5)
    assert scale[2] > 10 * scale[[0, 1, 3]].max()
    steps = codec.steps(4)
    for c in range(4):
        tol = 0.1 * scale[c]
        assert 2 * tol * (1 - 1e-3) * 7 / 8 < steps[c] <= 2 * tol * (1 - 1e-3)
        assert (q.channel_errors[:, c] <= tol).all()
    assert q.errors == pytest.approx(q.channel_errors.max(axis=1).tolist())
    assert not codec.bounded  # no single number bounds every channel


def test_relative_calibration_travels_in_the_options():
    x = relu_maps(4, c=3, hw=8)
    codec = make_codec("quant", 0.25, relative=True, **RANS)
    blob = codec.encode(x)
    again = make_codec("quant", 0.25, **json.loads(json.dumps(codec.options)))
    assert np.array_equal(again.channel_scale, codec.channel_scale)
    assert np.array_equal(again.decode(blob, x.shape), codec.decode(blob, x.shape))
    assert again.encode(x) == blob
    # A scale given up front is used as it is, not measured again.
    given = make_codec("quant", 0.25, relative=True, channel_scale=[1.0, 2.0, 4.0])
    given.encode(x)
    assert given.channel_tolerance.tolist() == [0.25, 0.5, 1.0]


def test_relative_dead_channel_gets_a_floor():
    x = relu_maps(2, c=3, hw=8)
    x[:, 1] = 0.0  # a dead channel: its spread is 0
    codec = make_codec("quant", 0.1, relative=True)
    out = codec.decode(codec.encode(x), x.shape)
    assert codec.channel_tolerance[1] == pytest.approx(1e-3 * codec.channel_tolerance.max())
    assert (per_channel_error(x, out, 1) <= codec.channel_tolerance).all()


@pytest.mark.parametrize("coding", ["rans", "zstd"])
def test_relative_channel_subset_carries_its_steps(coding):
    # Stored flipped channels (k, m, H, W) are channels [2, 0] of x: their steps travel along.
    x = relu_maps(4, c=3, hw=8)
    x[:, 2] *= 20.0
    codec = make_codec("quant", 0.1, relative=True, coding=coding)
    codec.quantize(x[None])  # x first: calibrates the scale
    extra = x[:, [2, 0]][None]
    q = codec.quantize(extra, channels=[2, 0])
    blob = codec.compress(q.payloads[0])
    out = codec.decode(blob, extra.shape[1:])
    assert (per_channel_error(extra[0], out, 1) <= codec.channel_tolerance[[2, 0]]).all()
    rebuilt = make_codec("quant", 0.1, **codec.options)  # a reader knows no channel indices
    assert np.array_equal(rebuilt.decode(blob, extra.shape[1:]), out)


def test_relative_input_errors():
    tiny = np.full((1, 2, 3, 3), 1e-36, np.float32)
    tiny[..., 0] = 3e-36
    with pytest.raises(FreezecacheError, match="almost no spread"):
        make_codec("quant", 0.1, relative=True).encode(tiny)
    with pytest.raises(FreezecacheError, match="needs relative: true"):
        make_codec("quant", 0.1, channel_scale=[1.0])
    with pytest.raises(FreezecacheError, match="channel_scale must be finite"):
        make_codec("quant", 0.1, relative=True, channel_scale=[1.0, -2.0])
    codec = make_codec("quant", 0.1, relative=True, channel_scale=[1.0, 2.0])
    with pytest.raises(FreezecacheError, match="for 2 channels, the data has 3"):
        codec.encode(relu_maps(1, c=3, hw=4))
    fresh = make_codec("quant", 0.1, relative=True)
    with pytest.raises(FreezecacheError, match="whole features before a channel subset"):
        fresh.quantize(relu_maps(1, c=3, hw=4)[None], channels=[0, 1, 2])
    with pytest.raises(FreezecacheError, match="coding 'lz4'"):
        make_codec("quant", 0.1, coding="lz4")


def test_channel_std_matches_numpy():
    x = normal_data((5, 3, 4, 4)) * np.array([1.0, 2.0, 3.0], np.float32)[None, :, None, None]
    want = x.transpose(1, 0, 2, 3).reshape(3, -1).std(axis=1)
    assert np.allclose(channel_std(x, 1), want, rtol=1e-6)


# -- the rANS stage -------------------------------------------------------------------------------
code_arrays = st.tuples(
    st.sampled_from([(1, 1, 1, 1), (1, 4, 3, 5), (2, 3, 7, 2), (1, 9, 2, 2), (3, 1, 8)]),
    st.integers(1, 3000),  # code range
    st.integers(0, 2**16),
)


@settings(max_examples=80, deadline=None)
@given(spec=code_arrays, fit_on_other=st.booleans())
def test_rans_round_trip_any_codes(spec, fit_on_other):
    shape, top, seed = spec
    rng = np.random.default_rng(seed)
    q = np.minimum(rng.geometric(0.3, shape) - 1, top).astype(np.int32)
    q[rng.random(shape) < 0.02] = top  # outliers: escapes
    train = np.minimum(rng.geometric(0.6, shape) - 1, 3) if fit_on_other else q
    rans = pytest.importorskip("freezecache.codecs.rans")  # numba: lazy, as the codec has it
    tables = rans.Tables(rans.fit_tables(train))
    words, escapes, lane_words, lane_escapes = tables.encode(q)
    width = 1 if top < 256 else 2
    out = np.empty((width, q.size), np.uint8)
    assert tables.decode_into(words, escapes, lane_words, lane_escapes, shape, out)
    got = join_planes(torch.from_numpy(out[None].copy()))[0].numpy().reshape(shape)
    assert np.array_equal(got, q)


def test_rans_tables_rows_sum_to_the_scale():
    rans = pytest.importorskip("freezecache.codecs.rans")
    freq = rans.fit_tables(np.random.default_rng(0).integers(0, 40, (4, 3, 9, 9)))
    assert freq.shape[0] == rans.N_CTX
    assert (freq.astype(np.int64).sum(axis=1) == rans.PROB_SCALE).all()
    assert (freq[:, -1] > 0).all()  # the escape is always possible


def test_rans_truncated_blob_is_refused():
    codec = make_codec("quant", 0.05, **RANS)
    x = relu_maps(1, c=8, hw=16)
    blob = codec.encode(x)
    with pytest.raises(FreezecacheError, match="truncated|corrupt"):
        codec.decode(blob[: len(blob) // 2], x.shape)


def test_rans_beats_zstd_on_relu_maps():
    x = relu_maps(16, c=8, hw=16)
    sizes = {}
    for coding in ("rans", "zstd"):
        codec = make_codec("quant", 0.05, coding=coding)
        q = codec.quantize(x[:, None])
        sizes[coding] = sum(len(codec.compress(p)) for p in q.payloads)
    assert sizes["rans"] < 0.9 * sizes["zstd"]


@pytest.mark.parametrize("span", [100.0, 2_000.0, 100_000.0])
def test_rans_handles_wide_codes(span):
    codec = make_codec("quant", 0.5, **RANS)
    x = np.linspace(0, span, 64 * 4, dtype=np.float32).reshape(1, 4, 8, 8)
    out = codec.decode(codec.encode(x), x.shape)
    assert max_error(x, out) <= 0.5


def test_rans_blobs_from_unaligned_memory_decode():
    # The in-memory cache hands out slices at any byte offset.
    codec = make_codec("quant", 0.05, **RANS)
    x = relu_maps(1, c=4, hw=8)
    blob = codec.encode(x)
    shifted = memoryview(b"\x00" + blob)[1:]
    assert np.array_equal(codec.decode(shifted, x.shape), codec.decode(blob, x.shape))


# -- the old absolute path ------------------------------------------------------------------------
def test_zstd_coding_writes_format_2_blobs():
    codec = make_codec("quant", 0.1)  # the default: unchanged since format 2
    x = relu_maps(1, c=3, hw=8)
    step, grain = exact_step(0.1)
    lo = np.floor(x.min(axis=(0, 2, 3)) / grain) * grain
    q = np.round((x - lo[None, :, None, None]) / step).astype(np.uint8)
    header = struct.pack("<4sBI", b"FCQ2", 1, 3)
    want = zstandard.ZstdCompressor(level=1).compress(
        header + lo.astype(np.float32).tobytes() + q.tobytes()
    )
    assert codec.encode(x) == want
    assert codec.options == {"zstd_level": 1, "channel_axis": None}


def test_format_2_blobs_decode_with_a_default_codec():
    # Caches written before rANS record {"zstd_level": 1, "channel_axis": None}.
    old = make_codec("quant", 0.1, coding="zstd")
    x = relu_maps(2, c=3, hw=8)
    blob = old.encode(x)
    reader = make_codec("quant", 0.1, **old.options)
    assert np.array_equal(reader.decode(blob, x.shape), old.decode(blob, x.shape))


# -- device decode --------------------------------------------------------------------------------
def _device_matches_cpu(device: str, codec_kwargs: dict) -> None:
    codec = make_codec("quant", **codec_kwargs)
    x = relu_maps(3, c=4, hw=8) * 5 + normal_data((3, 4, 8, 8))
    blobs = [codec.encode(x[i : i + 1]) for i in range(3)]
    shape = x.shape[1:]
    planes, los = zip(*(codec.unpack(b, (1, *shape)) for b in blobs), strict=True)
    step = codec.step_for((1, *shape))
    step = step if isinstance(step, float) else torch.from_numpy(step).to(device)
    got = dequantize(
        torch.from_numpy(np.stack(planes)).to(device),
        torch.from_numpy(np.concatenate(los)).to(device),
        step,
        shape,
    )
    want = np.concatenate([codec.decode(b, (1, *shape)) for b in blobs])
    assert got.dtype == torch.float32
    assert torch.equal(got.cpu(), torch.from_numpy(want))


DEVICE_CASES = [
    {"tolerance": 1e-3, "coding": "rans"},
    {"tolerance": 0.05},
    {"tolerance": 0.1, "relative": True, "coding": "rans"},
    {"tolerance": 0.01, "relative": True},
]


@pytest.mark.parametrize("kwargs", DEVICE_CASES)
def test_device_path_equals_cpu_decode(kwargs):
    _device_matches_cpu("cpu", kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kwargs", DEVICE_CASES)
def test_device_path_on_cuda_equals_cpu_decode(kwargs):
    _device_matches_cpu("cuda", kwargs)


# -- through the cache ----------------------------------------------------------------------------
def test_relative_cache_with_extra_channels_round_trips(tmp_path):
    x = relu_maps(6, c=4, hw=8) * np.array([1, 5, 0.2, 2], np.float32)[None, :, None, None]
    extra = x[:, [3, 1]][:, :, :, ::-1].copy()  # flipped copies of channels 3 and 1
    path = tmp_path / "rel.h5"
    codec = make_codec("quant", 0.2, relative=True, **RANS)
    with CacheWriter(
        path,
        codec,
        Layout(
            sample_shape=x.shape[1:],
            num_samples=6,
            chunk_size=1,
            extra_shape=extra.shape[1:],
            extra_index=[3, 1],
        ),
        prefix_hash="h",
        build=Build(workers=2),
    ) as writer:
        writer.add(x, np.arange(6), extra=extra)
    info = open_cache(path)
    bounds = np.asarray(info.codec_options["channel_scale"]) * 0.2
    items = [CacheDataset(path, info)[i] for i in range(6)]
    got = np.concatenate([it["x"].numpy() for it in items])
    got_extra = np.concatenate([it["extra"].numpy() for it in items])
    assert (per_channel_error(x, got, 1) <= bounds).all()
    assert (per_channel_error(extra, got_extra, 1) <= bounds[[3, 1]]).all()
    assert info.stats["max_abs_error"] <= bounds.max()
    loader = make_loader(path, info, batch_size=6, seed=0, workers=0, device_decode=True)
    batch = finish_batch(next(iter(loader)), info, "cpu")
    order = batch["index"].numpy()
    assert torch.equal(batch["x"], torch.from_numpy(got[order]))


def test_calibrate_measures_per_channel_std_of_samples():
    x = relu_maps(6, c=5, hw=4)
    codec = make_codec("quant", 0.2, relative=True)
    codec.calibrate(x)
    assert np.allclose(codec.channel_scale, channel_std(x, 1))
    tokens = normal_data((3, 7, 4)) * np.arange(1, 5, dtype=np.float32)
    codec = make_codec("quant", 0.2, relative=True)
    codec.calibrate(tokens)
    assert np.allclose(codec.channel_scale, channel_std(tokens, 2))


def test_rans_options_rebuild_the_same_codec():
    codec = make_codec("quant", 0.05, **RANS)
    x = relu_maps(2, c=4, hw=8)
    blob = codec.encode(x)  # fits the tables
    again = make_codec("quant", 0.05, **json.loads(json.dumps(codec.options)))
    assert again.encode(x) == blob
    assert np.array_equal(again.decode(blob, x.shape), codec.decode(blob, x.shape))
