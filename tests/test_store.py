"""The HDF5 activation cache: round trips, loaders, atomic writes and clear errors."""

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from freezecache.cache import loader as cache_loader
from freezecache.cache import packed
from freezecache.cache.format import RUN_KEYS, Layout, attrs_digest, open_cache
from freezecache.cache.loader import ChunkShuffleSampler, fits_in_memory, make_loader
from freezecache.cache.reader import CacheDataset, collate_chunks, finish_batch, iter_cache
from freezecache.cache.writer import Build, CacheWriter
from freezecache.codecs.registry import make_codec
from freezecache.core.errors import FreezecacheError

SHAPE = (4, 6, 6)
HASH = "a1b2c3d4e5f60718293a"


def activations(n: int, shape=SHAPE, seed: int = 0) -> np.ndarray:
    """Non-negative, partly zero maps like ReLU outputs."""
    x = np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)
    return np.maximum(x, 0)


def write(
    path: Path,
    x: np.ndarray,
    *,
    chunk_size=3,
    codec="quant",
    tol=1e-2,
    batch=4,
    extra=None,
    extra_pos=None,
    extra_index=None,
    workers=2,
) -> dict:
    """Write ``x`` with labels 0..n-1 (mod 10) in uneven batches; returns the stats."""
    n = len(x)
    y = np.arange(n) % 10
    with CacheWriter(
        path,
        make_codec(codec, tol),
        Layout(
            sample_shape=x.shape[1:],
            num_samples=n,
            chunk_size=chunk_size,
            extra_shape=None if extra is None else extra.shape[1:],
            extra_index=extra_index,
        ),
        prefix_hash=HASH,
        meta={"point": 1},
        build=Build(workers=workers),
    ) as writer:
        for lo in range(0, n, batch):
            writer.add(
                x[lo : lo + batch],
                y[lo : lo + batch],
                extra=None if extra is None else extra[lo : lo + batch],
                extra_pos=None if extra_pos is None else extra_pos[lo : lo + batch],
            )
    return writer.stats


@pytest.fixture
def cache(tmp_path) -> tuple[Path, np.ndarray]:
    x = activations(10)
    path = tmp_path / "cache.h5"
    write(path, x)
    return path, x


@pytest.mark.parametrize("chunk_size", [1, 3])
@pytest.mark.parametrize("codec", ["zfp", "quant"])
def test_writer_reader_roundtrip(tmp_path, chunk_size, codec):
    x = activations(10)
    path = tmp_path / "c.h5"
    stats = write(path, x, chunk_size=chunk_size, codec=codec, workers=2 if chunk_size == 3 else 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]  # no .tmp left
    info = open_cache(path, expect_prefix_hash=HASH)
    assert (info.num_samples, info.chunk_size, info.sample_shape) == (10, chunk_size, SHAPE)
    assert info.num_chunks == math.ceil(10 / chunk_size)
    assert (info.codec_name, info.tolerance, info.meta) == (codec, 1e-2, {"point": 1})
    assert set(stats) - set(info.stats) == set(RUN_KEYS)  # timings stay out of the file
    assert info.stats == json.loads(json.dumps({k: stats[k] for k in info.stats}))
    assert 0 < stats["max_abs_error"] <= 1e-2
    assert stats["compression_ratio"] == pytest.approx(stats["stored_bytes"] / x.nbytes)
    assert stats["raw_bytes"] == x.nbytes and stats["encode_mb_s"] > 0
    dataset = CacheDataset(path, info)
    items = [dataset[i] for i in range(len(dataset))]
    assert [len(item["y"]) for item in items][-1] == 10 - chunk_size * (info.num_chunks - 1)
    got = collate_chunks(items)
    assert torch.equal(got["index"], torch.arange(10))
    assert torch.equal(got["y"], torch.arange(10) % 10)
    assert got["x"].dtype == torch.float32 and got["x"].shape == (10, *SHAPE)
    assert (got["x"] - torch.from_numpy(x)).abs().max() <= 1e-2
    assert "extra" not in got and "extra_pos" not in got


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_raw_codec_roundtrip(tmp_path, dtype):
    # Raw blobs all have the same length, which h5py's vlen slice writes mishandle.
    x = activations(8)
    path = tmp_path / "c.h5"
    with CacheWriter(
        path,
        make_codec("none", 1e-2, dtype=dtype),
        Layout(sample_shape=SHAPE, num_samples=8, chunk_size=2),
        prefix_hash=HASH,
    ) as writer:
        writer.add(x, np.zeros(8))
    info = open_cache(path)
    assert info.codec_options == {"dtype": dtype}
    got = next(iter_cache(path, info))["x"].numpy()
    assert np.array_equal(got, x) if dtype == "float32" else np.allclose(got, x, rtol=2**-11)
    assert writer.stats["max_abs_error"] == float(np.abs(got - x).max())


def test_batched_reads_match_single_reads(cache):
    path, _ = cache
    dataset = CacheDataset(path, open_cache(path))
    batch = dataset.__getitems__([3, 0, 3, 1])  # unsorted, with a repeat
    for item, i in zip(batch, [3, 0, 3, 1], strict=True):
        single = dataset[i]
        assert all(torch.equal(item[k], single[k]) for k in single)


def test_file_reads_are_preads_of_the_contiguous_blobs_and_a_cut_file_is_refused(cache):
    path, _ = cache
    info = open_cache(path)
    dataset = CacheDataset(path, info)
    ids, last = [3, 0, 2], info.num_chunks - 1
    batch = dataset.__getitems__(ids)
    with h5py.File(path, "r") as f:  # the reader found where HDF5 keeps the bytes...
        assert dataset._at == {"x": f["x"].id.get_offset()}
        off = f["x_offsets"][()]
        sliced = [f["x"][off[i] : off[i + 1]].tobytes() for i in ids]
    assert [bytes(b) for _, b, _ in dataset.read(ids)] == sliced  # ...and reads them
    memory = CacheDataset(path, info, in_memory=True).__getitems__(ids)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(batch, memory, strict=True) for k in a)
    with open(path, "r+b") as f:  # cut inside the last blob, after the reader opened the file
        f.truncate(dataset._at["x"] + int(off[-1]) - 3)
    with pytest.raises(FreezecacheError, match=f"chunk {last} of 'x' is corrupt"):
        dataset[last]


def test_extra_channels_roundtrip(tmp_path):
    x = activations(7)
    extra = activations(7, shape=(2, 6, 6), seed=1)  # e.g. two stored flipped channels
    path = tmp_path / "c.h5"
    stats = write(path, x, extra=extra, extra_index=[3, 1])
    info = open_cache(path)
    assert info.extra_shape == (2, 6, 6) and info.extra_index == (3, 1)
    assert not info.has_extra_pos
    assert 0 < stats["extra_max_abs_error"] <= 1e-2
    assert stats["raw_bytes"] == x.nbytes + extra.nbytes
    got = collate_chunks([CacheDataset(path, info)[i] for i in range(info.num_chunks)])
    assert (got["extra"] - torch.from_numpy(extra)).abs().max() <= 1e-2


def test_extra_tokens_and_positions_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((5, 9, 8)).astype(np.float32)  # (n, N, D)
    extra = rng.standard_normal((5, 3, 8)).astype(np.float32)  # (n, m, D)
    pos = np.stack([rng.permutation(9)[:3] for _ in range(5)]).astype(np.int32)
    path = tmp_path / "c.h5"
    write(path, tokens, chunk_size=2, codec="zfp", extra=extra, extra_pos=pos)
    info = open_cache(path)
    assert info.has_extra_pos and info.extra_index == ()
    got = collate_chunks([CacheDataset(path, info)[i] for i in range(info.num_chunks)])
    assert torch.equal(got["extra_pos"], torch.from_numpy(pos).long())
    assert (got["extra"] - torch.from_numpy(extra)).abs().max() <= 1e-2
    assert (got["x"] - torch.from_numpy(tokens)).abs().max() <= 1e-2


def test_sampler_orders():
    sampler = ChunkShuffleSampler(50, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(50)) and len(sampler) == 50
    assert list(sampler) == first  # same (seed, epoch): same order
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(50)) and second != first
    assert list(ChunkShuffleSampler(50, seed=4)) != first
    assert list(ChunkShuffleSampler(5, seed=3, shuffle=False)) == [0, 1, 2, 3, 4]


def test_loader_visits_every_sample_once_per_epoch(cache):
    path, _ = cache
    info = open_cache(path)
    loader = make_loader(path, info, batch_size=7, seed=0, workers=0)
    assert loader.batch_size == 2  # 7 samples // chunk_size 3
    seen = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        seen.append(torch.cat([b["index"] for b in loader]).tolist())
    assert sorted(seen[0]) == sorted(seen[1]) == list(range(10))
    assert seen[0] != seen[1]


def test_loader_workers_give_the_same_batches(cache):
    path, _ = cache
    info = open_cache(path)
    runs = []
    for workers in (0, 2):
        loader = make_loader(path, info, batch_size=6, seed=5, workers=workers)
        loader.sampler.set_epoch(2)
        runs.append(list(loader))
    assert len(runs[0]) == len(runs[1]) == 2
    for a, b in zip(*runs, strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_device_decode_matches_cpu_decode(cache):
    path, _ = cache
    info = open_cache(path)
    plain = next(iter(make_loader(path, info, batch_size=6, seed=1, workers=0)))
    packed = next(
        iter(make_loader(path, info, batch_size=6, seed=1, workers=0, device_decode=True))
    )
    part = packed["x"]  # the codes as stored: a byte per value here (< 256 codes at 1e-2)
    assert part["buf"].dtype == np.uint8 and (part["width"] == 1).all()
    assert part["lo"].shape == (6, 4)
    done = finish_batch(packed, info, "cpu")
    assert torch.equal(done["x"], plain["x"])
    assert torch.equal(finish_batch(plain, info, "cpu")["x"], plain["x"])


def test_device_decode_pads_chunks_to_the_widest_code(tmp_path):
    x = activations(4) * 100  # tolerance 1e-3 over a range of ~300: three-byte codes
    x[:2] /= 1000  # the first chunk needs one byte
    path = tmp_path / "c.h5"
    write(path, x, chunk_size=2, tol=1e-3)
    info = open_cache(path)
    assert info.stats["max_code_bytes"] == 3
    batch = CacheDataset(path, info, device_decode=True).__getitems__([0, 1])[0]
    assert batch["x"]["width"].tolist() == [1, 1, 3, 3]  # per sample: its chunk's code width
    codes = packed.planes(batch["x"], math.prod(SHAPE))
    assert codes.shape == (4, 3, math.prod(SHAPE))
    assert not codes[:2, 1:].any()  # the narrow chunk's missing planes are zero
    x_dec = finish_batch(batch, info, "cpu")["x"]
    assert (x_dec - torch.from_numpy(x)).abs().max() <= 1e-3


@pytest.mark.parametrize("codec", ["quant", "zfp"])
def test_in_memory_loader_gives_the_same_batches(tmp_path, codec):
    x = activations(10)
    path = tmp_path / "c.h5"
    write(path, x, codec=codec, extra=activations(10, (2, 6, 6), seed=1), extra_index=[0, 3])
    info = open_cache(path)
    runs = []
    for in_memory in (False, True):
        loader = make_loader(path, info, batch_size=6, seed=5, workers=0, in_memory=in_memory)
        loader.sampler.set_epoch(1)
        runs.append(list(loader))
    for a, b in zip(*runs, strict=True):
        assert a.keys() == b.keys() and "extra" in a
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_fits_in_memory_compares_stored_bytes(cache, monkeypatch):
    info = open_cache(cache[0])
    stored = info.stats["stored_bytes"]
    monkeypatch.setattr(cache_loader, "_available_bytes", lambda: 4 * stored + 4)
    assert fits_in_memory(info)
    monkeypatch.setattr(cache_loader, "_available_bytes", lambda: 4 * stored - 4)
    assert not fits_in_memory(info)


def test_device_decode_needs_quant(tmp_path):
    path = tmp_path / "c.h5"
    write(path, activations(3), codec="zfp")
    with pytest.raises(FreezecacheError, match="device_decode needs the quant codec"):
        CacheDataset(path, open_cache(path), device_decode=True)


def test_iter_cache_reads_everything_in_order(cache):
    path, x = cache
    info = open_cache(path)
    batches = list(iter_cache(path, info, batch_chunks=2))
    assert [len(b["y"]) for b in batches] == [6, 4]
    got = torch.cat([b["x"] for b in batches])
    assert torch.equal(torch.cat([b["index"] for b in batches]), torch.arange(10))
    assert (got - torch.from_numpy(x)).abs().max() <= 1e-2


def test_iter_cache_starts_at_a_chunk(cache):
    path, _ = cache
    info = open_cache(path)
    whole = list(iter_cache(path, info, batch_chunks=2))
    rest = list(iter_cache(path, info, batch_chunks=2, first_chunk=2))
    assert len(rest) == 1 and all(torch.equal(rest[0][k], whole[1][k]) for k in whole[1])


def test_exception_inside_writer_leaves_no_file(tmp_path):
    path = tmp_path / "c.h5"
    with pytest.raises(RuntimeError, match="boom"):
        with CacheWriter(
            path,
            make_codec("zfp", 1e-2),
            Layout(sample_shape=SHAPE, num_samples=4, chunk_size=2),
            prefix_hash=HASH,
        ) as writer:
            writer.add(activations(3), np.zeros(3))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_nan_activations_fail_cleanly(tmp_path):
    x = activations(6)
    x[4, 0, 0, 0] = np.nan
    with pytest.raises(FreezecacheError, match="NaN/Inf"):
        write(tmp_path / "c.h5", x, chunk_size=2)
    assert list(tmp_path.iterdir()) == []


def test_short_sample_count_fails_cleanly(tmp_path):
    path = tmp_path / "c.h5"
    with pytest.raises(FreezecacheError, match="got 3 samples, declared 5"):
        with CacheWriter(
            path,
            make_codec("quant", 1e-2),
            Layout(sample_shape=SHAPE, num_samples=5, chunk_size=2),
            prefix_hash=HASH,
        ) as writer:
            writer.add(activations(3), np.zeros(3))
    assert list(tmp_path.iterdir()) == []


class _LeakyCodec:
    """Claims a bound, then decodes 2 * tolerance off."""

    name, tolerance, bounded, options = "none", 1e-2, True, {}

    def encode(self, x):
        return x.tobytes()

    def decode(self, buf, shape):
        return np.frombuffer(buf, np.float32).reshape(shape) + 2e-2


def test_broken_bound_is_refused(tmp_path):
    path = tmp_path / "c.h5"
    with pytest.raises(FreezecacheError, match="broke its bound"):
        with CacheWriter(
            path,
            _LeakyCodec(),
            Layout(sample_shape=SHAPE, num_samples=2, chunk_size=2),
            prefix_hash=HASH,
        ) as writer:
            writer.add(activations(2), np.zeros(2))
    assert list(tmp_path.iterdir()) == []


def test_corrupt_blob_is_caught_by_crc(cache):
    path, _ = cache
    with h5py.File(path, "r") as f:
        start, stop = f["x_offsets"][1:3]
        blob = f["x"][start:stop].tobytes()
    raw = bytearray(path.read_bytes())
    at = raw.find(blob)
    assert at > 0 and raw.find(blob, at + 1) == -1
    raw[at + len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    dataset = CacheDataset(path, open_cache(path))
    dataset[0]  # other chunks still read
    with pytest.raises(FreezecacheError, match=r"chunk 1 of 'x' is corrupt \(crc mismatch\)"):
        dataset[1]
    with pytest.raises(FreezecacheError, match=r"chunk 1 of 'x' is corrupt"):
        CacheDataset(path, open_cache(path), in_memory=True)


def test_truncated_file_is_refused(cache):
    path, _ = cache
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FreezecacheError, match=r"not a readable HDF5 file .*dvc repro cache_p1"):
        open_cache(path, stage="cache_p1")


def test_not_hdf5_and_missing_files_are_refused(tmp_path):
    with pytest.raises(FreezecacheError, match=r"c\.h5 does not exist — rerun `dvc repro"):
        open_cache(tmp_path / "c.h5")
    (tmp_path / "c.h5").write_text("hello")
    with pytest.raises(FreezecacheError, match="not a readable HDF5 file"):
        open_cache(tmp_path / "c.h5")


def test_wrong_prefix_hash_names_both(cache):
    path, _ = cache
    with pytest.raises(FreezecacheError, match="prefix a1b2c3d4e5f6 but this run's prefix is ffff"):
        open_cache(path, expect_prefix_hash="ffff00001111")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda a: a.__delitem__("complete"), "incomplete"),
        (lambda a: a.__setitem__("format_version", 99), "format_version 99"),
        (lambda a: a.__setitem__("num_samples", 11), "attributes do not match their digest"),
        (lambda a: a.__delitem__("sample_shape"), "attributes do not match their digest"),
        (lambda a: a.__setitem__("extra", 1), "attributes do not match their digest"),
    ],
)
def test_damaged_attributes_are_refused(cache, edit, message):
    path, _ = cache
    with h5py.File(path, "r+") as f:
        edit(f.attrs)
    with pytest.raises(FreezecacheError, match=message) as err:
        open_cache(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda a: a.__setitem__("num_samples", 11), "inconsistent counts"),
        (lambda a: a.__setitem__("num_chunks", 3), "inconsistent counts"),
        (lambda a: a.__delitem__("sample_shape"), "missing or malformed attribute"),
        (lambda a: a.__setitem__("digests", "{}"), r"its digests name \[\]"),
    ],
)
def test_inconsistent_attributes_are_refused_behind_a_fresh_digest(cache, edit, message):
    # An edit that also rewrites attrs_digest still meets the cross-checks behind it.
    path, _ = cache
    with h5py.File(path, "r+") as f:
        edit(f.attrs)
        f.attrs["attrs_digest"] = attrs_digest(f.attrs)
    with pytest.raises(FreezecacheError, match=message) as err:
        open_cache(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
