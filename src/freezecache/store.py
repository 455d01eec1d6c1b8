"""The activation cache: one HDF5 file holding a frozen prefix's outputs for a whole data set.

File layout (``format_version`` 1)::

    x          vlen uint8 (num_chunks,)    one codec blob per chunk of k = chunk_size samples;
                                           chunk i holds samples [i*k, min((i+1)*k, num_samples))
    crc        uint32 (num_chunks,)        zlib.crc32 of each x blob
    y          int64 (num_samples,)        labels in data-set order
    extra      vlen uint8 (num_chunks,)    optional: codec blob of the chunk's augmentation data,
                                           (k, *extra_shape), e.g. stored flipped channels
                                           (k, m, H, W) or replacement tokens (k, m, D)
    extra_crc  uint32 (num_chunks,)        optional: zlib.crc32 of each extra blob
    extra_pos  int64 (num_samples, m)      optional: token positions of the extra tokens

    root attrs: format_version, codec, codec_options (json), tolerance, chunk_size,
                num_samples, num_chunks, sample_shape, extra_shape ([] if none),
                extra_index (CNN channel indices shared by all samples, or []),
                prefix_hash, meta (json, the caller's), stats (json, below), complete = 1

stats: ``raw_bytes`` (float32 size of x and extra), ``stored_bytes`` (their blobs),
``compression_ratio`` = stored / raw, ``x_compression_ratio`` (x alone), ``extra_stored_bytes``,
``max_abs_error`` / ``extra_max_abs_error`` (measured by decoding every blob; None without
verify), ``encode_s`` (encode + verify seconds summed over threads), ``encode_mb_s`` (raw MB per
such second, i.e. per thread), ``max_code_bytes`` (widest quant code; 0 for other codecs).

A writer builds the file under ``path.with_suffix(".tmp")`` and renames it into place only
after a clean close, so a file at ``path`` with ``complete = 1`` is always whole.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from freezecache.codec import Codec, QuantCodec, dequantize, make_codec
from freezecache.errors import FreezecacheError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_BLOB = h5py.vlen_dtype(np.uint8)
_WRITE_BATCH = 64  # chunks per HDF5 write


def _write_blobs(ds: h5py.Dataset, first: int, blobs: list[bytes]) -> None:
    """Write ``blobs`` to rows first, first+1, ... of a vlen dataset in one call.

    write_direct, because ``ds[a:b] = rows`` turns equal-length rows into a 2-D array and fails.
    """
    rows = np.empty(len(blobs), dtype=_BLOB)
    for j, blob in enumerate(blobs):
        rows[j] = np.frombuffer(blob, np.uint8)
    ds.write_direct(rows, dest_sel=np.s_[first : first + len(blobs)])


def _rerun_hint(stage: str | None) -> str:
    """The 'what to do' half of cache errors."""
    if stage:
        return f"rerun `dvc repro {stage}`"
    return "rerun `dvc repro` for the stage that writes it"


@dataclass(frozen=True)
class _Encoded:
    """One chunk after encoding (and verification) in a worker thread."""

    index: int
    blob: bytes
    error: float
    extra_blob: bytes | None
    extra_error: float
    seconds: float
    code_bytes: int  # quant code width; 0 for other codecs


def _max_error(x: np.ndarray, decoded: np.ndarray) -> float:
    """Exact max |x - decoded| (float64: a float32 difference could round below the bound)."""
    if x.size == 0:
        return 0.0
    return float(np.abs(x.astype(np.float64) - decoded).max())


def _encode_chunk(
    codec: Codec, index: int, x: np.ndarray, extra: np.ndarray | None, verify: bool
) -> _Encoded:
    """Encode one chunk (and its extra data), optionally decoding it to measure the error."""
    start = time.perf_counter()
    blob = codec.encode(x)
    error = _max_error(x, codec.decode(blob, x.shape)) if verify else float("nan")
    extra_blob, extra_error = None, 0.0
    if extra is not None:
        extra_blob = codec.encode(extra)
        if verify:
            extra_error = _max_error(extra, codec.decode(extra_blob, extra.shape))
    code_bytes = codec.code_bytes(blob) if isinstance(codec, QuantCodec) else 0
    return _Encoded(
        index, blob, error, extra_blob, extra_error, time.perf_counter() - start, code_bytes
    )


class CacheWriter:
    """Writes a cache file chunk by chunk; use as a context manager.

    Samples arrive through :meth:`add` in data-set order, in batches of any size; the writer cuts
    them into chunks of ``chunk_size`` and encodes chunks in a thread pool (zfpy and zstandard
    release the GIL) while the caller computes the next batch.
    """

    def __init__(
        self,
        path: Path,
        *,
        codec: Codec,
        sample_shape: tuple[int, ...],
        chunk_size: int,
        num_samples: int,
        prefix_hash: str,
        extra_shape: tuple[int, ...] | None = None,
        extra_index: list[int] | None = None,
        meta: dict | None = None,
        workers: int = 2,
        verify: bool = True,
    ) -> None:
        if chunk_size < 1 or num_samples < 1:
            raise FreezecacheError(
                f"cache {path}: chunk_size ({chunk_size}) and num_samples ({num_samples}) "
                "must be >= 1 — fix the cache params"
            )
        self.path = Path(path)
        self.tmp_path = self.path.with_suffix(".tmp")
        self.codec = codec
        self.sample_shape = tuple(int(n) for n in sample_shape)
        self.extra_shape = tuple(int(n) for n in extra_shape) if extra_shape is not None else None
        self.extra_index = [int(i) for i in (extra_index or [])]
        self.chunk_size = chunk_size
        self.num_samples = num_samples
        self.num_chunks = math.ceil(num_samples / chunk_size)
        self.prefix_hash = prefix_hash
        self.meta = meta or {}
        self.verify = verify
        self._received = 0
        self._next_chunk = 0
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._in_flight: deque[Future[_Encoded]] = deque()
        self._ready: list[_Encoded] = []
        self._max_in_flight = 2 * max(workers, 1)
        self._pool = ThreadPoolExecutor(workers) if workers > 0 else None
        self._totals = {
            "stored": 0,
            "extra_stored": 0,
            "error": 0.0,
            "extra_error": 0.0,
            "seconds": 0.0,
            "code_bytes": 0,
        }
        self._stats_done: dict | None = None
        self._file = self._create_file()

    def _create_file(self) -> h5py.File:
        """Open the temp file and lay out the fixed-size datasets."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(self.tmp_path, "w")
        f.create_dataset("x", (self.num_chunks,), dtype=_BLOB)
        f.create_dataset("crc", (self.num_chunks,), dtype=np.uint32)
        f.create_dataset("y", (self.num_samples,), dtype=np.int64)
        if self.extra_shape is not None:
            f.create_dataset("extra", (self.num_chunks,), dtype=_BLOB)
            f.create_dataset("extra_crc", (self.num_chunks,), dtype=np.uint32)
        return f

    @property
    def stats(self) -> dict:
        """The stats :meth:`close` returned (available after the ``with`` block)."""
        if self._stats_done is None:
            raise ValueError(f"cache writer for {self.path}: stats exist only after close()")
        return self._stats_done

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def add(
        self,
        x: np.ndarray,
        y: np.ndarray,
        extra: np.ndarray | None = None,
        extra_pos: np.ndarray | None = None,
    ) -> None:
        """Append samples ``x`` (n, *sample_shape) with labels ``y`` (n,) in data-set order.

        ``extra`` (n, *extra_shape) is required when the writer has an ``extra_shape``;
        ``extra_pos`` (n, m) holds per-sample token positions of the extra tokens.
        """
        x = np.asarray(x, dtype=np.float32)
        n = len(x)
        self._check_batch(x, y, extra, extra_pos)
        start = self._received
        self._file["y"][start : start + n] = np.asarray(y, dtype=np.int64)
        if extra_pos is not None:
            self._extra_pos_dataset(extra_pos.shape[1])[start : start + n] = extra_pos
        self._received += n
        self._pending.append((x, None if extra is None else np.asarray(extra, np.float32)))
        self._cut_chunks(final=False)

    def _check_batch(self, x, y, extra, extra_pos) -> None:
        """Reject batches that do not match the declared shapes or overflow num_samples."""
        n = len(x)
        if x.shape[1:] != self.sample_shape or np.shape(y) != (n,):
            raise ValueError(
                f"add: expected x (n, {self.sample_shape}) and y (n,), got {x.shape}, {np.shape(y)}"
            )
        if (extra is None) != (self.extra_shape is None):
            raise ValueError("add: pass extra exactly when the writer was given extra_shape")
        if extra is not None and np.shape(extra) != (n, *self.extra_shape):
            raise ValueError(f"add: extra must be {(n, *self.extra_shape)}, got {np.shape(extra)}")
        has_pos = "extra_pos" in self._file
        if extra_pos is not None and (np.ndim(extra_pos) != 2 or len(extra_pos) != n):
            raise ValueError(f"add: extra_pos must be (n, m), got {np.shape(extra_pos)}")
        if self._received and has_pos != (extra_pos is not None):
            raise ValueError("add: pass extra_pos in every call or in none")
        if self._received + n > self.num_samples:
            raise FreezecacheError(
                f"cache {self.path}: got more than the declared {self.num_samples} samples — "
                "pass the data set's length as num_samples"
            )

    def _extra_pos_dataset(self, m: int) -> h5py.Dataset:
        """The extra_pos dataset, created on first use (m is known only then)."""
        if "extra_pos" not in self._file:
            self._file.create_dataset("extra_pos", (self.num_samples, m), dtype=np.int64)
        return self._file["extra_pos"]

    def _cut_chunks(self, final: bool) -> None:
        """Submit every full chunk in the pending buffer (and the short last one if final)."""
        available = sum(len(x) for x, _ in self._pending)
        if available < self.chunk_size and not (final and available):
            return
        xs = np.concatenate([x for x, _ in self._pending])  # (available, *sample_shape)
        extras = None
        if self.extra_shape is not None:
            extras = np.concatenate([e for _, e in self._pending])  # (available, *extra_shape)
        k = self.chunk_size
        full = available if final else available - available % k
        for lo in range(0, full, k):
            chunk_extra = None if extras is None else extras[lo : lo + k]
            self._submit(xs[lo : lo + k], chunk_extra)
        rest_extra = None if extras is None else extras[full:].copy()
        self._pending = [(xs[full:].copy(), rest_extra)] if full < available else []

    def _submit(self, x: np.ndarray, extra: np.ndarray | None) -> None:
        """Queue one chunk for encoding; write finished chunks to keep memory bounded."""
        args = (self.codec, self._next_chunk, x, extra, self.verify)
        self._next_chunk += 1
        if self._pool is None:
            self._write(_encode_chunk(*args))
            return
        self._in_flight.append(self._pool.submit(_encode_chunk, *args))
        while len(self._in_flight) >= self._max_in_flight:
            self._write(self._in_flight.popleft().result())

    def _write(self, enc: _Encoded) -> None:
        """Take one encoded chunk (they arrive in order) and fold its numbers into the totals."""
        self._ready.append(enc)
        totals = self._totals
        totals["stored"] += len(enc.blob)
        totals["extra_stored"] += len(enc.extra_blob or b"")
        totals["error"] = max(totals["error"], enc.error)
        totals["extra_error"] = max(totals["extra_error"], enc.extra_error)
        totals["seconds"] += enc.seconds
        totals["code_bytes"] = max(totals["code_bytes"], enc.code_bytes)
        if len(self._ready) >= _WRITE_BATCH:
            self._flush()

    def _flush(self) -> None:
        """Write the ready chunks as one slice: h5py writes vlen rows far faster in bulk."""
        if not self._ready:
            return
        first = self._ready[0].index
        rows = slice(first, first + len(self._ready))
        _write_blobs(self._file["x"], first, [enc.blob for enc in self._ready])
        self._file["crc"][rows] = [zlib.crc32(enc.blob) for enc in self._ready]
        if self.extra_shape is not None:
            extras = [enc.extra_blob for enc in self._ready]
            _write_blobs(self._file["extra"], first, extras)
            self._file["extra_crc"][rows] = [zlib.crc32(blob) for blob in extras]
        self._ready.clear()

    def close(self) -> dict:
        """Finish the last chunk, check counts and the error bound, then publish the file."""
        if self._stats_done is not None:
            return self._stats_done
        try:
            self._cut_chunks(final=True)
            while self._in_flight:
                self._write(self._in_flight.popleft().result())
            self._flush()
            self._check_complete()
            stats = self._stats()
            self._write_attrs(stats)
            self._file.close()
            self._shutdown()
            os.replace(self.tmp_path, self.path)
        except BaseException:
            self._abort()
            raise
        log.info(
            "cache %s: %d samples, ratio %.3f, max error %s",
            self.path,
            self.num_samples,
            stats["compression_ratio"],
            stats["max_abs_error"],
        )
        self._stats_done = stats
        return stats

    def _check_complete(self) -> None:
        """All declared samples arrived and the codec kept its bound."""
        if self._received != self.num_samples:
            raise FreezecacheError(
                f"cache {self.path}: got {self._received} samples, declared {self.num_samples} — "
                "pass the data set's length as num_samples"
            )
        worst = max(self._totals["error"], self._totals["extra_error"])
        if self.verify and self.codec.bounded and worst > self.codec.tolerance:
            raise FreezecacheError(
                f"cache {self.path}: codec {self.codec.name} broke its bound (max error "
                f"{worst:.3g} > tolerance {self.codec.tolerance:g}) — use another codec or a "
                "larger tolerance"
            )

    def _stats(self) -> dict:
        """Sizes, ratio, errors and encode speed of the finished cache."""
        t = self._totals
        per_sample = 4 * math.prod(self.sample_shape)
        extra_per_sample = 4 * math.prod(self.extra_shape) if self.extra_shape is not None else 0
        raw = self.num_samples * (per_sample + extra_per_sample)
        stored = t["stored"] + t["extra_stored"]
        verified = self.verify
        return {
            "raw_bytes": raw,
            "stored_bytes": stored,
            "compression_ratio": stored / raw,
            "x_compression_ratio": t["stored"] / (self.num_samples * per_sample),
            "extra_stored_bytes": t["extra_stored"],
            "max_abs_error": t["error"] if verified else None,
            "extra_max_abs_error": t["extra_error"] if verified and self.extra_shape else None,
            # Summed over worker threads, so MB/s is per thread.
            "encode_s": t["seconds"],
            "encode_mb_s": raw / 1e6 / t["seconds"] if t["seconds"] > 0 else None,
            "max_code_bytes": t["code_bytes"],
        }

    def _write_attrs(self, stats: dict) -> None:
        """Root attributes; ``complete`` goes last so a crash never leaves it set."""
        attrs = self._file.attrs
        attrs["format_version"] = FORMAT_VERSION
        attrs["codec"] = self.codec.name
        attrs["codec_options"] = json.dumps(self.codec.options)
        attrs["tolerance"] = float(self.codec.tolerance)
        attrs["chunk_size"] = self.chunk_size
        attrs["num_samples"] = self.num_samples
        attrs["num_chunks"] = self.num_chunks
        attrs["sample_shape"] = np.array(self.sample_shape, dtype=np.int64)
        attrs["extra_shape"] = np.array(self.extra_shape or (), dtype=np.int64)
        attrs["extra_index"] = np.array(self.extra_index, dtype=np.int64)
        attrs["prefix_hash"] = self.prefix_hash
        attrs["meta"] = json.dumps(self.meta)
        attrs["stats"] = json.dumps(stats)
        attrs["complete"] = 1

    def _shutdown(self) -> None:
        """Stop the encoder threads, dropping queued work."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _abort(self) -> None:
        """Drop everything: never leave a half-written cache behind."""
        self._shutdown()
        self._in_flight.clear()
        self._ready.clear()
        if self._file.id.valid:
            self._file.close()
        self.tmp_path.unlink(missing_ok=True)


@dataclass(frozen=True)
class CacheInfo:
    """What :func:`open_cache` read from a cache's root attributes."""

    path: Path
    format_version: int
    codec_name: str
    codec_options: dict
    tolerance: float
    chunk_size: int
    num_samples: int
    num_chunks: int
    sample_shape: tuple[int, ...]
    extra_shape: tuple[int, ...] | None
    extra_index: tuple[int, ...]
    prefix_hash: str
    has_extra_pos: bool
    meta: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    def codec(self) -> Codec:
        """The codec the cache was written with."""
        return make_codec(self.codec_name, self.tolerance, **self.codec_options)

    def chunk_bounds(self, i: int) -> tuple[int, int]:
        """Sample range [start, stop) of chunk ``i``."""
        start = i * self.chunk_size
        return start, min(start + self.chunk_size, self.num_samples)


def open_cache(
    path: Path, *, expect_prefix_hash: str | None = None, stage: str | None = None
) -> CacheInfo:
    """Check a cache file and read its description; ``stage`` names the producer in errors."""
    path = Path(path)
    hint = _rerun_hint(stage)
    if not path.is_file():
        raise FreezecacheError(f"cache {path} does not exist — {hint}")
    try:
        with h5py.File(path, "r") as f:
            info = _read_info(path, f, hint)
    except (KeyError, ValueError, TypeError) as err:  # a root attribute missing or malformed
        raise FreezecacheError(
            f"cache {path} has a missing or malformed attribute ({err}) — {hint}"
        ) from None
    except OSError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FreezecacheError(
            f"cache {path} is not a readable HDF5 file ({reason}) — {hint}"
        ) from None
    if expect_prefix_hash is not None and info.prefix_hash != expect_prefix_hash:
        raise FreezecacheError(
            f"cache {path} was built from prefix {info.prefix_hash[:12]} but this run's prefix "
            f"is {expect_prefix_hash[:12]} — {hint}"
        )
    return info


def _read_info(path: Path, f: h5py.File, hint: str) -> CacheInfo:
    """Read and cross-check the root attributes of an open cache file."""
    attrs = f.attrs
    if int(attrs.get("complete", 0)) != 1:
        raise FreezecacheError(f"cache {path} is incomplete (no complete flag) — {hint}")
    version = int(attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise FreezecacheError(
            f"cache {path} has format_version {version}, this freezecache reads "
            f"{FORMAT_VERSION} — {hint}"
        )
    extra_shape = tuple(int(n) for n in attrs["extra_shape"])
    info = CacheInfo(
        path=path,
        format_version=version,
        codec_name=str(attrs["codec"]),
        codec_options=json.loads(attrs["codec_options"]),
        tolerance=float(attrs["tolerance"]),
        chunk_size=int(attrs["chunk_size"]),
        num_samples=int(attrs["num_samples"]),
        num_chunks=int(attrs["num_chunks"]),
        sample_shape=tuple(int(n) for n in attrs["sample_shape"]),
        extra_shape=extra_shape if "extra" in f else None,
        extra_index=tuple(int(i) for i in attrs["extra_index"]),
        prefix_hash=str(attrs["prefix_hash"]),
        has_extra_pos="extra_pos" in f,
        meta=json.loads(attrs["meta"]),
        stats=json.loads(attrs["stats"]),
    )
    _check_counts(info, f, hint)
    return info


def _check_counts(info: CacheInfo, f: h5py.File, hint: str) -> None:
    """Dataset lengths agree with num_samples, chunk_size and num_chunks."""
    expected = {"x": info.num_chunks, "crc": info.num_chunks, "y": info.num_samples}
    if info.extra_shape is not None:
        expected.update(extra=info.num_chunks, extra_crc=info.num_chunks)
    if info.has_extra_pos:
        expected["extra_pos"] = info.num_samples
    actual = {name: len(f[name]) if name in f else None for name in expected}
    chunks_ok = info.num_chunks == math.ceil(info.num_samples / max(info.chunk_size, 1))
    if not chunks_ok or actual != expected:
        raise FreezecacheError(
            f"cache {info.path} has inconsistent counts (num_samples {info.num_samples}, "
            f"chunk_size {info.chunk_size}, num_chunks {info.num_chunks}, datasets {actual}) — "
            f"{hint}"
        )


class CacheDataset(Dataset):
    """Item i is chunk i: ``x`` (k, *sample_shape) float32, ``y`` and ``index`` (k,) int64,
    plus ``extra`` / ``extra_pos`` when the cache has them.

    With ``device_decode=True`` (quant only) ``x`` stays as integer codes, uint8 or int32 for
    the whole cache so that batches stack, and ``x_lo`` (k, *lo_shape[1:]) rides along for
    :func:`finish_batch` to dequantize on the training device.
    """

    def __init__(self, path: Path, info: CacheInfo, *, device_decode: bool = False) -> None:
        self.path = Path(path)
        self.info = info
        self.codec = info.codec()
        if device_decode and not isinstance(self.codec, QuantCodec):
            raise FreezecacheError(
                f"cache {info.path}: device_decode needs the quant codec, not "
                f"{info.codec_name} — set device_decode false"
            )
        self.device_decode = device_decode
        # Integer codes above uint8 go to int32: torch has little uint16/uint32 support, and
        # the encoder keeps codes below 2^24.
        self._code_dtype = np.uint8 if info.stats.get("max_code_bytes", 4) == 1 else np.int32
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._small: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self.info.num_chunks

    def __getstate__(self) -> dict:
        # An open h5py handle cannot cross a process boundary; each worker reopens.
        return {**self.__dict__, "_file": None, "_pid": None, "_small": {}}

    def _h5(self) -> h5py.File:
        """The file, opened lazily once per process (never before DataLoader workers fork).

        Labels, crcs and token positions are small: they are read into memory here once, so
        that an item costs one blob read instead of several tiny HDF5 reads.
        """
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
            names = ("y", "crc", "extra_crc", "extra_pos")
            self._small = {name: self._file[name][()] for name in names if name in self._file}
        return self._file

    def _blobs(self, name: str, ids: list[int]) -> list[bytes]:
        """Blobs ``ids`` of dataset ``name``, crc-checked; one HDF5 read for the whole list."""
        ds = self._h5()[name]
        order = sorted(set(ids))
        # h5py reads a list of vlen elements much faster than one element at a time, but
        # wants the list sorted and without repeats.
        rows = [ds[order[0]]] if len(order) == 1 else list(ds[order])
        by_id = dict(zip(order, (row.tobytes() for row in rows), strict=True))
        crcs = self._small["extra_crc" if name == "extra" else "crc"]
        for i in order:
            if zlib.crc32(by_id[i]) != int(crcs[i]):
                raise FreezecacheError(
                    f"cache {self.path}: chunk {i} of '{name}' is corrupt (crc mismatch) — "
                    "rebuild the cache (`dvc repro`)"
                )
        return [by_id[i] for i in ids]

    def read(self, ids: list[int]) -> list[tuple[int, bytes, bytes | None]]:
        """Raw (id, x blob, extra blob) for chunks ``ids``: the I/O half of an item."""
        xs = self._blobs("x", ids)
        has_extra = self.info.extra_shape is not None
        extras = self._blobs("extra", ids) if has_extra else [None] * len(ids)
        return list(zip(ids, xs, extras, strict=True))

    def build(self, i: int, blob: bytes, extra_blob: bytes | None) -> dict:
        """Decode one chunk's blobs into its item: the CPU half (safe to run in threads)."""
        start, stop = self.info.chunk_bounds(i)
        k = stop - start
        item = {
            "y": torch.from_numpy(self._small["y"][start:stop].copy()),
            "index": torch.arange(start, stop, dtype=torch.int64),
        }
        item.update(self._decode_x(blob, (k, *self.info.sample_shape)))
        if extra_blob is not None:
            extra = self.codec.decode(extra_blob, (k, *self.info.extra_shape))
            item["extra"] = torch.from_numpy(extra)
        if "extra_pos" in self._small:
            item["extra_pos"] = torch.from_numpy(self._small["extra_pos"][start:stop].copy())
        return item

    def __getitems__(self, ids: list[int]) -> list[dict]:
        # DataLoader calls this with a whole batch of chunk ids: one read per dataset.
        return [self.build(*raw) for raw in self.read(list(ids))]

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def _decode_x(self, blob: bytes, shape: tuple[int, ...]) -> dict:
        """Decoded ``x``, or integer codes plus per-sample ``x_lo`` when decoding on device."""
        if not self.device_decode:
            return {"x": torch.from_numpy(self.codec.decode(blob, shape))}
        q, lo = self.codec.unpack(blob, shape)
        x_lo = np.broadcast_to(lo, (shape[0], *lo.shape[1:])).copy()  # (k, C, 1, 1) / (k, 1, D)
        codes = q.astype(self._code_dtype)  # a writable copy in the cache-wide dtype
        return {"x": torch.from_numpy(codes), "x_lo": torch.from_numpy(x_lo)}


def collate_chunks(items: list[dict]) -> dict:
    """Concatenate chunk items along the sample axis into one batch."""
    return {key: torch.cat([item[key] for item in items]) for key in items[0]}


def finish_batch(batch: dict, info: CacheInfo, device: torch.device | str) -> dict:
    """Move a batch to ``device`` and dequantize ``x`` there if it is still packed."""
    out = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    if "x_lo" in out:
        step = info.codec().step
        out["x"] = dequantize(out["x"], out.pop("x_lo"), step)
    return out


class ChunkShuffleSampler(Sampler[int]):
    """Chunk order for one epoch: a permutation seeded by (seed, epoch); identity if not shuffle.

    Shuffling whole chunks (the paper's coarse-grained shuffling) keeps each read one blob.
    """

    def __init__(self, num_chunks: int, seed: int, shuffle: bool = True) -> None:
        self.num_chunks = num_chunks
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_chunks))
        rng = np.random.default_rng([self.seed, self.epoch])
        return iter(rng.permutation(self.num_chunks).tolist())

    def __len__(self) -> int:
        return self.num_chunks


def make_loader(
    path: Path,
    info: CacheInfo,
    *,
    batch_size: int,
    seed: int,
    workers: int,
    shuffle: bool = True,
    device_decode: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """DataLoader over whole chunks; ``batch_size`` in samples (rounded down to chunks, >= 1).

    Call ``loader.sampler.set_epoch(epoch)`` before each epoch.
    """
    chunks_per_batch = max(1, batch_size // info.chunk_size)
    return DataLoader(
        CacheDataset(path, info, device_decode=device_decode),
        batch_size=chunks_per_batch,
        sampler=ChunkShuffleSampler(info.num_chunks, seed, shuffle),
        num_workers=workers,
        collate_fn=collate_chunks,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
    )


def iter_cache(
    path: Path, info: CacheInfo, batch_chunks: int = 64, workers: int = 2
) -> Iterator[dict]:
    """Read the whole cache in order, decoded on CPU, ``batch_chunks`` chunks per batch.

    For pushing a cache through more blocks; decoding runs in ``workers`` threads.
    """
    dataset = CacheDataset(path, info)
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        for first in range(0, info.num_chunks, batch_chunks):
            raw = dataset.read(list(range(first, min(first + batch_chunks, info.num_chunks))))
            # h5py serialises reads behind one lock, so only decoding runs in the threads.
            yield collate_chunks(list(pool.map(lambda r: dataset.build(*r), raw)))
