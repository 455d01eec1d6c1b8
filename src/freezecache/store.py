"""The activation cache: one HDF5 file holding a frozen prefix's outputs for a whole data set.

File layout (``format_version`` 2)::

    x            uint8 (total bytes,)        the codec blobs of all chunks, back to back; chunk i
                                             holds samples [i*k, min((i+1)*k, num_samples))
    x_offsets    int64 (num_chunks + 1,)     blob i is x[x_offsets[i]:x_offsets[i + 1]]
    crc          uint32 (num_chunks,)        zlib.crc32 of each x blob
    y            int64 (num_samples,)        labels in data-set order
    extra        uint8, extra_offsets,       optional: codec blobs of the chunks' augmentation
    extra_crc                                data (k, *extra_shape), e.g. stored flipped channels
                                             (k, m, H, W) or replacement tokens (k, m, D)
    extra_pos    int64 (num_samples, m)      optional: token positions of the extra tokens

    root attrs: format_version, codec, codec_options (json), tolerance, chunk_size,
                num_samples, num_chunks, sample_shape, extra_shape ([] if none),
                extra_index (CNN channel indices shared by all samples, or []),
                prefix_hash, meta (json, the caller's), stats (json, below), complete = 1

One flat byte array plus offsets, not a variable-length HDF5 dataset: h5py spends about 0.3 ms
per variable-length element, more than decoding a sample, while a flat slice is one memcpy, and
a whole cache can be read into memory in one call (:class:`CacheDataset` ``in_memory``).

stats: ``raw_bytes`` (float32 size of x and extra), ``stored_bytes`` (their blobs),
``compression_ratio`` = stored / raw, ``x_compression_ratio`` (x alone), ``extra_stored_bytes``,
``max_abs_error`` / ``extra_max_abs_error`` (zfp and none: measured by decoding every blob;
quant: the largest per-chunk bound, proved or measured, see :meth:`QuantCodec.quantize`; None
without verify), ``encode_s`` (encode + verify seconds summed over threads), ``encode_mb_s`` (raw
MB per such second), ``max_code_bytes`` (widest quant code; 0 for other codecs).

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

from freezecache.codec import Codec, QuantCodec, Quantized, dequantize, make_codec
from freezecache.errors import FreezecacheError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
_WRITE_BATCH = 64  # chunks per HDF5 write
_TASK_CHUNKS = 32  # chunks per encoder-thread task
_BYTES_CHUNK = 1 << 18  # HDF5 chunk of the flat byte datasets


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """``np.concatenate(parts)``, without the copy when there is one part."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _rerun_hint(stage: str | None) -> str:
    """The 'what to do' half of cache errors."""
    if stage:
        return f"rerun `dvc repro {stage}`"
    return "rerun `dvc repro` for the stage that writes it"


@dataclass(frozen=True)
class _Encoded:
    """One chunk after encoding (and verification)."""

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
    return _Encoded(index, blob, error, extra_blob, extra_error, time.perf_counter() - start, 0)


def _encode_group(
    codec: Codec, first: int, xs: np.ndarray, extras: np.ndarray | None, verify: bool
) -> list[_Encoded]:
    """Encode chunks ``xs`` (m, k, ...) one by one (zfp, none): the thread-pool task."""
    return [
        _encode_chunk(codec, first + j, xs[j], None if extras is None else extras[j], verify)
        for j in range(len(xs))
    ]


def _compress_group(
    codec: QuantCodec, first: int, x: Quantized, extra: Quantized | None, quant_s: float
) -> list[_Encoded]:
    """zstd stage of quant chunks already quantised by the caller: the thread-pool task."""
    start = time.perf_counter()
    blobs = [codec.compress(p) for p in x.payloads]
    extra_blobs = [codec.compress(p) for p in extra.payloads] if extra else [None] * len(blobs)
    seconds = (time.perf_counter() - start + quant_s) / len(blobs)
    return [
        _Encoded(
            first + j,
            blob,
            x.errors[j],
            extra_blobs[j],
            extra.errors[j] if extra else 0.0,
            seconds,
            x.widths[j],
        )
        for j, blob in enumerate(blobs)
    ]


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
        self._in_flight: deque[Future[list[_Encoded]]] = deque()
        self._offsets: dict[str, list[int]] = {"x": [0], "extra": [0]}
        self._crcs: dict[str, list[int]] = {"x": [], "extra": []}
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
        f.create_dataset("y", (self.num_samples,), dtype=np.int64)
        for name in ("x", "extra") if self.extra_shape is not None else ("x",):
            f.create_dataset(name, (0,), maxshape=(None,), chunks=(_BYTES_CHUNK,), dtype=np.uint8)
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
        # (available, *sample_shape) and (available, *extra_shape); no copy for a lone batch
        xs = _joined([x for x, _ in self._pending])
        extras = None if self.extra_shape is None else _joined([e for _, e in self._pending])
        k = self.chunk_size
        full = available - available % k
        if full:
            m = full // k
            group_extra = None if extras is None else extras[:full].reshape(m, k, *self.extra_shape)
            self._submit(xs[:full].reshape(m, k, *self.sample_shape), group_extra)
        if final and full < available:  # the short last chunk
            self._submit(xs[None, full:], None if extras is None else extras[None, full:])
            full = available
        rest_extra = None if extras is None else extras[full:].copy()
        self._pending = [(xs[full:].copy(), rest_extra)] if full < available else []

    def _submit(self, xs: np.ndarray, extras: np.ndarray | None) -> None:
        """Queue equal chunks ``xs`` (m, k, ...) for encoding; keeps memory bounded.

        quant is quantised here, in torch on all cores, and only its zstd stage goes to the
        thread pool, so that zstd overlaps the caller's next batch; other codecs encode chunk by
        chunk in the pool.
        """
        first = self._next_chunk
        self._next_chunk += len(xs)
        if isinstance(self.codec, QuantCodec):
            start = time.perf_counter()
            quant_x = self.codec.quantize(xs)
            # Stored flipped channels are a subset of x's: a relative codec needs their indices.
            channels = self.extra_index or None
            quant_extra = None if extras is None else self.codec.quantize(extras, channels)
            per_chunk = (time.perf_counter() - start) / len(xs)
            tasks = [
                (_compress_group, self.codec, first + lo, quant_x[lo : lo + _TASK_CHUNKS],
                 quant_extra[lo : lo + _TASK_CHUNKS] if quant_extra else None,
                 per_chunk * len(quant_x[lo : lo + _TASK_CHUNKS].payloads))
                for lo in range(0, len(xs), _TASK_CHUNKS)
            ]  # fmt: skip
        else:
            tasks = [
                (_encode_group, self.codec, first + lo, xs[lo : lo + _TASK_CHUNKS],
                 None if extras is None else extras[lo : lo + _TASK_CHUNKS], self.verify)
                for lo in range(0, len(xs), _TASK_CHUNKS)
            ]  # fmt: skip
        for task, *args in tasks:
            if self._pool is None:
                self._write(task(*args))
                continue
            self._in_flight.append(self._pool.submit(task, *args))
            while len(self._in_flight) >= self._max_in_flight:
                self._write(self._in_flight.popleft().result())

    def _write(self, encoded: list[_Encoded]) -> None:
        """Take encoded chunks (they arrive in order) and fold their numbers into the totals."""
        totals = self._totals
        for enc in encoded:
            self._ready.append(enc)
            totals["stored"] += len(enc.blob)
            totals["extra_stored"] += len(enc.extra_blob or b"")
            totals["error"] = max(totals["error"], enc.error)
            totals["extra_error"] = max(totals["extra_error"], enc.extra_error)
            totals["seconds"] += enc.seconds
            totals["code_bytes"] = max(totals["code_bytes"], enc.code_bytes)
        if len(self._ready) >= _WRITE_BATCH:
            self._flush()

    def _flush(self) -> None:
        """Append the ready chunks' blobs to the flat byte datasets in one write each."""
        if not self._ready:
            return
        self._append("x", [enc.blob for enc in self._ready])
        if self.extra_shape is not None:
            self._append("extra", [enc.extra_blob for enc in self._ready])
        self._ready.clear()

    def _append(self, name: str, blobs: list[bytes]) -> None:
        """Blobs onto the end of dataset ``name``; offsets and crcs are kept for close()."""
        data = np.frombuffer(b"".join(blobs), np.uint8)
        ds, start = self._file[name], self._offsets[name][-1]
        ds.resize((start + len(data),))
        ds[start:] = data
        ends = start + np.cumsum([len(blob) for blob in blobs])
        self._offsets[name].extend(int(e) for e in ends)
        self._crcs[name].extend(zlib.crc32(blob) for blob in blobs)

    def _write_index(self) -> None:
        """Offsets and crcs of every blob, written once all blobs are in."""
        prefixes = {"x": ""} if self.extra_shape is None else {"x": "", "extra": "extra_"}
        for name, prefix in prefixes.items():
            self._file[f"{name}_offsets"] = np.array(self._offsets[name], dtype=np.int64)
            self._file[f"{prefix}crc"] = np.array(self._crcs[name], dtype=np.uint32)

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
            self._write_index()
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
    blobs = ("x", "extra") if info.extra_shape is not None else ("x",)
    expected = {"y": info.num_samples}
    for name in blobs:
        prefix = "" if name == "x" else "extra_"
        expected.update({f"{name}_offsets": info.num_chunks + 1, f"{prefix}crc": info.num_chunks})
    if info.has_extra_pos:
        expected["extra_pos"] = info.num_samples
    actual = {name: len(f[name]) if name in f else None for name in expected}
    chunks_ok = info.num_chunks == math.ceil(info.num_samples / max(info.chunk_size, 1))
    ends_ok = all(
        name in f and f"{name}_offsets" in f and f[f"{name}_offsets"][-1] == len(f[name])
        for name in blobs
    ) if actual == expected else False  # fmt: skip
    if not chunks_ok or actual != expected or not ends_ok:
        raise FreezecacheError(
            f"cache {info.path} has inconsistent counts (num_samples {info.num_samples}, "
            f"chunk_size {info.chunk_size}, num_chunks {info.num_chunks}, datasets {actual}) — "
            f"{hint}"
        )


def _corrupt(path: Path, name: str, i: int) -> FreezecacheError:
    """The error for a blob whose crc does not match."""
    return FreezecacheError(
        f"cache {path}: chunk {i} of '{name}' is corrupt (crc mismatch) — "
        "rebuild the cache (`dvc repro`)"
    )


class CacheDataset(Dataset):
    """Item i is chunk i: ``x`` (k, *sample_shape) float32, ``y`` and ``index`` (k,) int64,
    plus ``extra`` / ``extra_pos`` when the cache has them.

    With ``device_decode=True`` (quant only) ``x`` stays packed as uint8 byte planes
    (k, width, numel), width the widest of the cache so that batches stack, and ``x_lo``
    (k, *lo_shape[1:]) rides along for :func:`finish_batch` to dequantize on the training device.

    With ``in_memory=True`` the compressed bytes of the whole cache are read once, every crc is
    checked once, and an item is a slice of memory instead of an HDF5 read. The compressed cache
    is what is held (a fraction of the float32 features), in host memory, never on the device.
    """

    def __init__(
        self, path: Path, info: CacheInfo, *, device_decode: bool = False, in_memory: bool = False
    ) -> None:
        self.path = Path(path)
        self.info = info
        self.codec = info.codec()
        if device_decode and not isinstance(self.codec, QuantCodec):
            raise FreezecacheError(
                f"cache {info.path}: device_decode needs the quant codec, not "
                f"{info.codec_name} — set device_decode false"
            )
        self.device_decode = device_decode
        self._width = max(1, int(info.stats.get("max_code_bytes", 1)))
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._small: dict[str, np.ndarray] = {}
        self._memory: dict[str, np.ndarray] | None = None
        if in_memory:
            self._memory = self._load_all()

    def __len__(self) -> int:
        return self.info.num_chunks

    def __getstate__(self) -> dict:
        # An open h5py handle cannot cross a process boundary; each worker reopens. The
        # in-memory bytes travel (forked workers share their pages).
        return {**self.__dict__, "_file": None, "_pid": None, "_small": {}}

    def _h5(self) -> h5py.File:
        """The file, opened lazily once per process (never before DataLoader workers fork).

        Labels, offsets, crcs and token positions are small: they are read into memory here
        once, so that an item costs one slice read per blob.
        """
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
            names = ("y", "crc", "extra_crc", "extra_pos", "x_offsets", "extra_offsets")
            self._small = {name: self._file[name][()] for name in names if name in self._file}
        return self._file

    def _load_all(self) -> dict[str, np.ndarray]:
        """Every blob byte of the cache, crc-checked once, then the file closed."""
        f = self._h5()
        names = ("x", "extra") if self.info.extra_shape is not None else ("x",)
        memory = {name: f[name][()] for name in names}
        for name, data in memory.items():
            offsets, crcs = self._index(name)
            view = memoryview(data)
            for i in range(self.info.num_chunks):
                if zlib.crc32(view[offsets[i] : offsets[i + 1]]) != int(crcs[i]):
                    raise _corrupt(self.path, name, i)
        f.close()
        self._file = None
        return memory

    def _index(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Offsets and crcs of dataset ``name``."""
        crc = "extra_crc" if name == "extra" else "crc"
        return self._small[f"{name}_offsets"], self._small[crc]

    def _blobs(self, name: str, ids: list[int]) -> list[memoryview | bytes]:
        """Blobs ``ids`` of dataset ``name``: memory slices, or crc-checked slice reads."""
        if self._memory is not None:
            offsets, _ = self._index(name)
            view = memoryview(self._memory[name])
            return [view[offsets[i] : offsets[i + 1]] for i in ids]
        ds = self._h5()[name]
        offsets, crcs = self._index(name)
        if ids == list(range(ids[0], ids[0] + len(ids))):  # in order (iter_cache): one read
            data = ds[offsets[ids[0]] : offsets[ids[-1] + 1]].tobytes()
            base = offsets[ids[0]]
            blobs = [data[offsets[i] - base : offsets[i + 1] - base] for i in ids]
        else:
            blobs = [ds[offsets[i] : offsets[i + 1]].tobytes() for i in ids]
        for i, blob in zip(ids, blobs, strict=True):
            if zlib.crc32(blob) != int(crcs[i]):
                raise _corrupt(self.path, name, i)
        return blobs

    def read(self, ids: list[int]) -> list[tuple[int, bytes, bytes | None]]:
        """Raw (id, x blob, extra blob) for chunks ``ids``: the I/O half of an item."""
        if self._memory is None:
            self._h5()
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
        # DataLoader calls this with a whole batch of chunk ids.
        raw = self.read(list(ids))
        if self.device_decode and self.info.extra_shape is None and len(raw) > 1:
            return [self._packed_batch(raw)]  # one item holding the whole batch
        return [self.build(*r) for r in raw]

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def _packed_batch(self, raw: list[tuple[int, bytes, None]]) -> dict:
        """Device-decode batch built in place: zstd output goes straight into one array.

        The same result as building every chunk and concatenating, minus a copy and the
        per-chunk tensors; this is the hot path of training from a quant cache.
        """
        bounds = [self.info.chunk_bounds(i) for i, _, _ in raw]
        sizes = [stop - start for start, stop in bounds]
        n = math.prod(self.info.sample_shape)
        packed = np.zeros((sum(sizes), self._width, n), np.uint8)
        lo_rows = []
        row = 0
        for (_, blob, _), k in zip(raw, sizes, strict=True):
            planes, lo = self.codec.unpack(blob, (k, *self.info.sample_shape))
            width = planes.shape[0]
            packed[row : row + k, :width] = planes.reshape(width, k, n).transpose(1, 0, 2)
            lo_rows.append(np.broadcast_to(lo, (k, *lo.shape[1:])))
            row += k
        y = self._small["y"]
        return {
            "y": torch.from_numpy(np.concatenate([y[a:b] for a, b in bounds])),
            "index": torch.from_numpy(np.concatenate([np.arange(a, b) for a, b in bounds])),
            "x": torch.from_numpy(packed),
            "x_lo": torch.from_numpy(np.concatenate(lo_rows)),
        }

    def _decode_x(self, blob: bytes, shape: tuple[int, ...]) -> dict:
        """Decoded ``x``, or byte planes plus per-sample ``x_lo`` when decoding on device."""
        if not self.device_decode:
            return {"x": torch.from_numpy(self.codec.decode(blob, shape))}
        planes, lo = self.codec.unpack(blob, shape)  # (w, k * numel), lo (1, C, 1, 1) / (1, 1, D)
        k, width = shape[0], planes.shape[0]
        packed = np.zeros((k, self._width, planes.shape[1] // k), np.uint8)
        packed[:, :width] = planes.reshape(width, k, -1).transpose(1, 0, 2)
        x_lo = np.broadcast_to(lo, (k, *lo.shape[1:])).copy()  # (k, C, 1, 1) / (k, 1, D)
        return {"x": torch.from_numpy(packed), "x_lo": torch.from_numpy(x_lo)}


def collate_chunks(items: list[dict]) -> dict:
    """Concatenate chunk items along the sample axis into one batch."""
    if len(items) == 1:
        return items[0]  # already a batch (CacheDataset._packed_batch): no copy
    return {key: torch.cat([item[key] for item in items]) for key in items[0]}


def finish_batch(batch: dict, info: CacheInfo, device: torch.device | str) -> dict:
    """Move a batch to ``device`` and dequantize ``x`` there if it is still packed."""
    out = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    if "x_lo" in out:
        step = info.codec().step_for((1, *info.sample_shape))  # float, or (1, C, 1, 1) steps
        if not isinstance(step, float):
            step = torch.from_numpy(step).to(device, non_blocking=True)
        out["x"] = dequantize(out["x"], out.pop("x_lo"), step, info.sample_shape)
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


class ShardedChunkBatches(Sampler[list[int]]):
    """One rank's chunk batches: every global batch of ``chunks_per_batch`` chunks, taken from
    the epoch's permutation (the same on every rank), cut into contiguous shares that differ by
    at most one chunk; this rank yields its own share of each.

    Its length is the number of global steps (every rank steps together). Only the last global
    batch can be short; when it has fewer chunks than ranks, the last ranks' share of it is empty
    and not yielded (:attr:`empty_tail`): the training loop steps on an empty batch there.
    """

    def __init__(
        self, order: ChunkShuffleSampler, chunks_per_batch: int, rank: int, world: int
    ) -> None:
        if chunks_per_batch < world or order.num_chunks < world:
            raise FreezecacheError(
                f"{min(chunks_per_batch, order.num_chunks)} cache chunks per batch cannot be "
                f"shared by {world} processes — raise train.batch_size or lower cache.chunk_size"
            )
        self.order = order
        self.chunks_per_batch = chunks_per_batch
        self.rank = rank
        self.world = world

    def set_epoch(self, epoch: int) -> None:
        self.order.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        ids = list(self.order)
        for lo in range(0, len(ids), self.chunks_per_batch):
            group = ids[lo : lo + self.chunks_per_batch]
            mine = group[_share(len(group), self.rank, self.world)]
            if mine:
                yield mine

    @property
    def empty_tail(self) -> bool:
        """Whether this rank's share of the last global batch is empty."""
        tail = self.order.num_chunks % self.chunks_per_batch
        return 0 < tail <= self.rank

    def __len__(self) -> int:
        return math.ceil(self.order.num_chunks / self.chunks_per_batch)


def _share(n: int, rank: int, world: int) -> slice:
    """Contiguous shares differing by at most one, the larger to the lower ranks (as
    :func:`freezecache.distributed.share`, which store does not import)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Select the epoch a loader from :func:`make_loader` yields next (one rank or several)."""
    sharded = isinstance(loader.batch_sampler, ShardedChunkBatches)
    (loader.batch_sampler if sharded else loader.sampler).set_epoch(epoch)


def empty_tail(loader: DataLoader) -> bool:
    """Whether this rank's share of the epoch's last global batch is empty (see
    :class:`ShardedChunkBatches`); False in one process."""
    sampler = loader.batch_sampler
    return isinstance(sampler, ShardedChunkBatches) and sampler.empty_tail


def _available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fits_in_memory(info: CacheInfo, share: float = 0.25) -> bool:
    """Whether the compressed cache takes at most ``share`` of the available memory.

    Where the available memory is unknown, caches up to 1 GB count as fitting.
    """
    stored = int(info.stats.get("stored_bytes", 0))
    available = _available_bytes()
    return stored <= (share * available if available is not None else 1e9)


def held_in_memory(info: CacheInfo, in_memory: bool | str, procs_per_host: int = 1) -> bool:
    """Whether :func:`make_loader` holds the compressed cache in memory: ``in_memory``, or for
    "auto" whether each of ``procs_per_host`` copies fits in its part of the share."""
    if in_memory == "auto":
        return fits_in_memory(info, share=0.25 / max(1, procs_per_host))
    return bool(in_memory)


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
    in_memory: bool | str = False,
    shard: tuple[int, int] = (0, 1),
    procs_per_host: int = 1,
) -> DataLoader:
    """DataLoader over whole chunks; ``batch_size`` in samples (rounded down to chunks, >= 1).

    ``in_memory``: True, False or "auto" (:func:`fits_in_memory`, each of ``procs_per_host``
    processes on a host taking its part of the share). Call :func:`set_epoch` (one process:
    ``loader.sampler.set_epoch``) before each epoch.

    ``shard=(rank, world)``: with several processes each global batch is cut into per-rank
    shares of whole chunks (:class:`ShardedChunkBatches`); the loader yields this rank's.
    """
    chunks_per_batch = max(1, batch_size // info.chunk_size)
    in_memory = held_in_memory(info, in_memory, procs_per_host)
    dataset = CacheDataset(path, info, device_decode=device_decode, in_memory=in_memory)
    order = ChunkShuffleSampler(info.num_chunks, seed, shuffle)
    common = {
        "num_workers": workers,
        "collate_fn": collate_chunks,
        "pin_memory": pin_memory,
        "persistent_workers": workers > 0,
    }
    if shard[1] > 1:
        batches = ShardedChunkBatches(order, chunks_per_batch, *shard)
        return DataLoader(dataset, batch_sampler=batches, **common)
    return DataLoader(dataset, batch_size=chunks_per_batch, sampler=order, **common)


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
