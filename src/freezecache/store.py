"""The activation cache: one HDF5 file holding a frozen prefix's outputs for a whole data set.

File layout (``format_version`` 3)::

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
                prefix_hash, meta (json, the caller's), stats (json, below),
                digests (json: sha256 of each index dataset, see :func:`array_digest`),
                complete = 1, attrs_digest (sha256 of all the others, :func:`attrs_digest`)

One flat byte array plus offsets, not a variable-length HDF5 dataset: h5py spends about 0.3 ms
per variable-length element, more than decoding a sample, while a flat slice is one memcpy, and
a whole cache can be read into memory in one call (:class:`CacheDataset` ``in_memory``).

Every byte training reads is checked: :func:`open_cache` checks the attributes and the index
datasets (labels, offsets, crcs, token positions) against their digests, and every blob is
checked against its crc when it is read (or all at once: ``open_cache(full=True)``).

stats: ``raw_bytes`` (float32 size of x and extra), ``stored_bytes`` (their blobs),
``compression_ratio`` = stored / raw, ``x_compression_ratio`` (x alone), ``extra_stored_bytes``,
``max_abs_error`` / ``extra_max_abs_error`` (zfp and none: measured by decoding every blob;
quant: the largest per-chunk bound, proved or measured, see :meth:`QuantCodec.quantize`; None
without verify), ``max_code_bytes`` (widest quant code; 0 for other codecs). No timings: the
same samples and parameters give a byte-identical file (:meth:`CacheWriter.close` returns them).

A writer spools encoded chunks (:mod:`freezecache.spool`), then writes the file in one pass
under ``path.with_suffix(".tmp")`` and renames it into place, so a file at ``path`` is whole.
HDF5 writes only the small datasets and the metadata; the blob bytes are copied into space
reserved for them, so a full disk meets plain file writes, never HDF5's.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import math
import os
import shutil
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
from freezecache.disk import (
    H5_OVERHEAD,
    check_free_space,
    estimate_cache_bytes,
    free_bytes,
    human,
    is_no_space,
)
from freezecache.errors import FreezecacheError
from freezecache.spool import Spool, SpoolIndex, fsync_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
_TASK_CHUNKS = 32  # chunks per encoder-thread task
_COMMIT_BYTES = 256 << 20  # spool bytes after which a commit is due even before commit_s
_SPACE_SAMPLE = 64  # samples of the first batch encoded for the disk-space estimate
_LIBVER = ("v110", "v110")  # fixed HDF5 object formats: the same bytes from any HDF5 >= 1.10
_INDEX_DATASETS = ("y", "x_offsets", "crc", "extra_offsets", "extra_crc", "extra_pos")
_CHECK_PIECE = 16 << 20  # bytes per read when checking every blob (open_cache full=True)
# Root attributes in the order the writer creates them (the order is part of the file's bytes);
# digests, complete and attrs_digest follow.
ROOT_ATTRS = (
    "format_version",
    "codec",
    "codec_options",
    "tolerance",
    "chunk_size",
    "num_samples",
    "num_chunks",
    "sample_shape",
    "extra_shape",
    "extra_index",
    "prefix_hash",
    "meta",
    "stats",
)
# What CacheWriter.close() returns beyond the file's stats: this run's timings, never in the file.
RUN_KEYS = ("encode_s", "encode_mb_s", "assemble_s", "resumed_samples")


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
    crc: int
    error: float
    extra_blob: bytes | None
    extra_crc: int
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
    return _Encoded(
        index,
        blob,
        zlib.crc32(blob),
        error,
        extra_blob,
        zlib.crc32(extra_blob or b""),
        extra_error,
        time.perf_counter() - start,
        0,
    )


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
    crcs = [(zlib.crc32(b), zlib.crc32(e or b"")) for b, e in zip(blobs, extra_blobs, strict=True)]
    seconds = (time.perf_counter() - start + quant_s) / len(blobs)
    return [
        _Encoded(
            first + j,
            blob,
            crcs[j][0],
            x.errors[j],
            extra_blobs[j],
            crcs[j][1],
            extra.errors[j] if extra else 0.0,
            seconds,
            x.widths[j],
        )
        for j, blob in enumerate(blobs)
    ]


def needs_calibration(codec: Codec) -> bool:
    """Whether ``codec`` fixes parameters from the first data it encodes (a relative quant's
    channel scales, rANS tables): a build must then :func:`calibrate` it up front."""
    return isinstance(codec, QuantCodec) and (codec.relative or codec.coding == "rans")


def calibrate(codec: Codec, first: np.ndarray, chunk_size: int) -> None:
    """Calibrate ``codec`` on samples ``first`` (n, *sample_shape), cut into chunks of
    ``chunk_size``: a codec left to itself calibrates on whatever it encodes first (a writer's
    space estimate: one chunk), which for a resumed build is the chunk it resumes at. Calibrated
    up front on the data set's first samples, an interrupted, resumed or shared build encodes
    every chunk alike; the parameters are then in ``codec.options`` (and the spool's identity)."""
    if not needs_calibration(codec):
        return
    full = len(first) - len(first) % chunk_size
    chunks = first[:full].reshape(-1, chunk_size, *first.shape[1:]) if full else first[None]
    codec.quantize(np.ascontiguousarray(chunks, np.float32))


class CacheWriter:
    """Writes a cache file chunk by chunk; use as a context manager.

    Samples arrive through :meth:`add` in data-set order, in batches of any size; the writer cuts
    them into chunks of ``chunk_size`` and encodes chunks in a thread pool (zfpy and zstandard
    release the GIL) while the caller computes the next batch. Encoded chunks go to a spool
    (:mod:`freezecache.spool`, at ``spool_dir``) that is committed to disk about every
    ``commit_s`` seconds; :meth:`close` assembles the cache file from the spool in one pass, so
    its bytes depend only on the samples and the parameters.

    With a ``resume_key`` (a digest of everything the samples depend on, e.g. prefix and params
    hashes), a writer that finds a spool of the same key and layout keeps its verified chunks:
    :attr:`resume_from` samples (a multiple of ``chunk_size`` and of ``align``) are durable and
    the caller adds samples from there on. Without one, the spool is temporary.

    Before the first batch is written, the cache's size is estimated from that batch
    (:func:`freezecache.disk.estimate_cache_bytes`) and refused with one line when the spool's
    and the file's filesystems lack room. A disk that fills anyway stops the writer with one
    line; the temporary file is removed and nothing is published.

    Several processes can build one cache together: each writes the chunks of its own
    ``chunk_range`` with ``publish=False`` (samples from the range's first one, which must be a
    multiple of ``chunk_size`` and ``align``) and closes; then the writer of the first range
    calls :meth:`publish_ranges` with the other spools, which writes the file one writer would.
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
        spool_dir: Path | None = None,
        resume_key: str | None = None,
        align: int = 1,
        check_space: bool = True,
        commit_s: float = 1.0,
        chunk_range: tuple[int, int] | None = None,
        publish: bool = True,
    ) -> None:
        if chunk_size < 1 or num_samples < 1 or align < 1:
            raise FreezecacheError(
                f"cache {path}: chunk_size ({chunk_size}), num_samples ({num_samples}) and "
                f"align ({align}) must be >= 1 — fix the cache params"
            )
        self.path = Path(path)
        self.tmp_path = self.path.with_suffix(".tmp")
        self.spool_dir = Path(spool_dir or self.path.with_name(f".{self.path.name}.spool"))
        self.codec = codec
        self.sample_shape = tuple(int(n) for n in sample_shape)
        self.extra_shape = tuple(int(n) for n in extra_shape) if extra_shape is not None else None
        self.extra_index = [int(i) for i in (extra_index or [])]
        self.chunk_size = chunk_size
        self.num_samples = num_samples
        self.num_chunks = math.ceil(num_samples / chunk_size)
        self.first_chunk, self.end_chunk = chunk_range or (0, self.num_chunks)
        self.range_start = self.first_chunk * chunk_size
        self.range_end = min(self.end_chunk * chunk_size, num_samples)
        step = math.lcm(chunk_size, align)
        if not (0 <= self.first_chunk < self.end_chunk <= self.num_chunks) or (
            self.range_start % step
        ):
            raise ValueError(
                f"cache {path}: chunk range {chunk_range} must lie in [0, {self.num_chunks}) and "
                f"start at a multiple of {step} samples"
            )
        if not publish and resume_key is None:
            raise ValueError(f"cache {path}: a writer that only spools needs a resume_key")
        self.publish = publish
        self.prefix_hash = prefix_hash
        self.meta = meta or {}
        self.verify = verify
        self.resumable = resume_key is not None
        self.align = align
        self.commit_s = commit_s
        self._space_checked = not check_space
        self._pending: list[tuple] = []  # (x, extra, y, pos) of samples not yet in a chunk
        self._labels: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self._in_flight: deque[Future[list[_Encoded]]] = deque()
        self._max_in_flight = 2 * max(workers, 1)
        self._encode_s = 0.0
        self._encoded_samples = 0
        self._stats_done: dict | None = None
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path.unlink(missing_ok=True)  # left by a build killed while assembling
        self._spool = self._open_spool(resume_key)
        try:
            self.resume_from = self._resume_point()
        except BaseException:
            self._spool.close()
            raise
        self._received = self.resume_from
        self._next_chunk = self.first_chunk + self._spool.num_chunks
        index = self._spool.index()
        self._pos_width: int | None = index.pos.shape[1] if index.num_chunks else None
        self._last_commit = time.monotonic()
        self._pool = ThreadPoolExecutor(workers) if workers > 0 else None
        if self.resume_from > self.range_start:
            log.info("cache %s: resuming at sample %d", self.path, self.resume_from)

    def _open_spool(self, resume_key: str | None) -> Spool:
        """The build's spool (resumed when the key matches); a full disk gives one line."""
        try:
            return Spool(
                self.spool_dir,
                self._identity(resume_key),
                (self.first_chunk, self.end_chunk),
                resume=self.resumable,
                durable=self.resumable,
            )
        except OSError as err:
            if not is_no_space(err):
                raise
            if not self.resumable:
                shutil.rmtree(self.spool_dir, ignore_errors=True)
            raise FreezecacheError(
                f"cache {self.path}: the disk filled up while opening the build spool "
                f"{self.spool_dir} ({self._free()}); nothing was published — free space and rerun"
            ) from None

    def _identity(self, resume_key: str | None) -> str:
        """What a spool must have been built for to be resumed: the key and the layout."""
        if resume_key is None:
            return "temporary"
        layout = {
            "format_version": FORMAT_VERSION,
            "key": resume_key,
            "codec": self.codec.name,
            "codec_options": self.codec.options,
            "tolerance": float(self.codec.tolerance),
            "chunk_size": self.chunk_size,
            "num_samples": self.num_samples,
            "sample_shape": self.sample_shape,
            "extra_shape": self.extra_shape,
            "verify": self.verify,
            "prefix_hash": self.prefix_hash,
        }
        return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()

    def _resume_point(self) -> int:
        """The data-set sample to go on from: the range's end when the spool holds all of it,
        else the range's start plus a multiple of chunk_size and align."""
        if self._spool.num_chunks == self.end_chunk - self.first_chunk:
            return self.range_end
        step = math.lcm(self.chunk_size, self.align)
        keep = self._spool.num_samples // step * step
        if keep // self.chunk_size != self._spool.num_chunks:
            self._spool.cut(keep // self.chunk_size)
        return self.range_start + keep

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

    # -- adding samples --------------------------------------------------------------------------
    def add(
        self,
        x: np.ndarray,
        y: np.ndarray,
        extra: np.ndarray | None = None,
        extra_pos: np.ndarray | None = None,
    ) -> None:
        """Append samples ``x`` (n, *sample_shape) with labels ``y`` (n,) in data-set order.

        ``extra`` (n, *extra_shape) is required when the writer has an ``extra_shape``;
        ``extra_pos`` (n, m) holds per-sample token positions of the extra tokens. The first
        sample of the first call is sample :attr:`resume_from` of the data set.
        """
        try:
            self._add(x, y, extra, extra_pos)
        except Exception as err:
            if is_no_space(err):
                raise self._no_space(err) from None
            raise

    def _add(self, x, y, extra, extra_pos) -> None:
        x = np.asarray(x, dtype=np.float32)
        self._check_batch(x, y, extra, extra_pos)
        extra = None if extra is None else np.asarray(extra, np.float32)
        pos = None if extra_pos is None else np.array(extra_pos, np.int64)
        if not self._space_checked:
            self._check_space(x, extra, pos)
        self._received += len(x)
        self._pending.append((x, extra, np.array(y, np.int64), pos))
        self._cut_chunks(final=False)

    def _check_batch(self, x, y, extra, extra_pos) -> None:
        """Reject batches that do not match the declared shapes or overflow num_samples."""
        n = len(x)
        if self._closed:
            raise ValueError(f"add: the writer for {self.path} is closed")
        if x.shape[1:] != self.sample_shape or np.shape(y) != (n,):
            raise ValueError(
                f"add: expected x (n, {self.sample_shape}) and y (n,), got {x.shape}, {np.shape(y)}"
            )
        if (extra is None) != (self.extra_shape is None):
            raise ValueError("add: pass extra exactly when the writer was given extra_shape")
        if extra is not None and np.shape(extra) != (n, *self.extra_shape):
            raise ValueError(f"add: extra must be {(n, *self.extra_shape)}, got {np.shape(extra)}")
        if extra_pos is not None and (np.ndim(extra_pos) != 2 or len(extra_pos) != n):
            raise ValueError(f"add: extra_pos must be (n, m), got {np.shape(extra_pos)}")
        width = 0 if extra_pos is None else np.shape(extra_pos)[1]
        if self._pos_width is None:
            self._pos_width = width
        elif width != self._pos_width:
            raise ValueError("add: pass extra_pos of one width in every call or in none")
        if self._received + n > self.range_end:
            raise FreezecacheError(
                f"cache {self.path}: got more than the declared {self.range_end} samples "
                f"(resumed at {self.resume_from}) — pass the data set's length as num_samples "
                "and add samples from writer.resume_from on"
            )

    def _check_space(self, x: np.ndarray, extra: np.ndarray | None, pos: np.ndarray | None) -> None:
        """Refuse to start when the estimated cache does not fit (spool and file, see class)."""
        n = min(len(x), _SPACE_SAMPLE)
        if n == 0:
            return
        estimate = estimate_cache_bytes(
            self.codec,
            x[:n],
            self.num_samples,
            None if extra is None else extra[:n],
            chunk_size=self.chunk_size,
            pos_width=0 if pos is None else pos.shape[1],
            extra_index=self.extra_index or None,
        )
        todo = (self.range_end - self.resume_from) / self.num_samples
        places = {self.spool_dir: estimate * todo}
        if self.publish:
            places[self.path.parent] = estimate
        check_free_space(places, what=f"cache {self.path} (its build spool and the file)")
        self._space_checked = True

    def _cut_chunks(self, final: bool) -> None:
        """Submit every full chunk in the pending buffer (and the short last one if final)."""
        available = sum(len(p[0]) for p in self._pending)
        if available < self.chunk_size and not (final and available):
            return
        # (available, *sample_shape), (available, *extra_shape), (available,), (available, m);
        # no copy for a lone batch
        xs, extras, ys, poss = (
            None if self._pending[0][i] is None else _joined([p[i] for p in self._pending])
            for i in range(4)
        )
        k = self.chunk_size
        full = available - available % k
        if full:
            m = full // k
            self._submit(
                xs[:full].reshape(m, k, *self.sample_shape),
                None if extras is None else extras[:full].reshape(m, k, *self.extra_shape),
                ys[:full].reshape(m, k),
                None if poss is None else poss[:full].reshape(m, k, -1),
            )
        if final and full < available:  # the short last chunk
            self._submit(*(None if a is None else a[None, full:] for a in (xs, extras, ys, poss)))
            full = available
        rest = [None if a is None else a[full:].copy() for a in (xs, extras, ys, poss)]
        self._pending = [tuple(rest)] if full < available else []

    def _submit(
        self, xs: np.ndarray, extras: np.ndarray | None, ys: np.ndarray, poss: np.ndarray | None
    ) -> None:
        """Queue equal chunks ``xs`` (m, k, ...) for encoding; keeps memory bounded.

        quant is quantised here, in torch on all cores, and only its zstd stage goes to the
        thread pool, so that zstd overlaps the caller's next batch; other codecs encode chunk by
        chunk in the pool.
        """
        first = self._next_chunk
        self._next_chunk += len(xs)
        for j in range(len(xs)):
            self._labels[first + j] = (ys[j], None if poss is None else poss[j])
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
        """Spool encoded chunks (they arrive in order); commit about every ``commit_s``."""
        for enc in encoded:
            y, pos = self._labels.pop(enc.index)
            self._spool.append(
                enc.blob,
                enc.extra_blob,
                crcs=(enc.crc, enc.extra_crc),
                errors=(enc.error, enc.extra_error),
                code_bytes=enc.code_bytes,
                y=y,
                pos=pos,
            )
            self._encode_s += enc.seconds
            self._encoded_samples += len(y)
        now = time.monotonic()
        if now - self._last_commit >= self.commit_s or self._spool.pending_bytes >= _COMMIT_BYTES:
            self._spool.commit()
            self._last_commit = now

    # -- finishing -------------------------------------------------------------------------------
    def close(self) -> dict:
        """Finish the last chunk, check counts and the error bound, then publish the file.

        Returns the file's stats (see the module docstring) plus this run's timings:
        ``encode_s`` (encode + verify seconds summed over threads), ``encode_mb_s`` (raw MB per
        such second), ``assemble_s`` (writing the file from the spool) and ``resumed_samples``.
        """
        if self._stats_done is not None:
            return self._stats_done
        if self._closed:
            raise ValueError(f"cache writer for {self.path}: close() after the build failed")
        try:
            self._cut_chunks(final=True)
            while self._in_flight:
                self._write(self._in_flight.popleft().result())
            self._spool.commit()
            self._shutdown()
            index = self._spool.index()
            self._check_complete(index)
            if not self.publish:  # one range of a build: its spool waits for publish_ranges
                self._spool.close()
                self._closed = True
                self._stats_done = self._timings(0.0)
                return self._stats_done
            stats = self._file_stats(index)
            start = time.perf_counter()
            try:
                assemble_cache(self.path, [self._spool], self._attrs(stats))
            except FreezecacheError as err:  # no room for the file: the spool can stay for it
                raise FreezecacheError(f"{err}; {self._kept()}") from None
            assemble_s = time.perf_counter() - start
            self._spool.remove()
            self._closed = True
        except BaseException as err:
            self._abort()
            if is_no_space(err):
                raise self._no_space(err) from None
            raise
        log.info(
            "cache %s: %d samples, ratio %.3f, max error %s",
            self.path,
            self.num_samples,
            stats["compression_ratio"],
            stats["max_abs_error"],
        )
        self._stats_done = {**stats, **self._timings(assemble_s)}
        return self._stats_done

    def _timings(self, assemble_s: float) -> dict:
        raw_mb = self._encoded_samples * self._raw_per_sample() / 1e6
        return {
            # Summed over worker threads, so MB/s is per thread.
            "encode_s": self._encode_s,
            "encode_mb_s": raw_mb / self._encode_s if self._encode_s > 0 else None,
            "assemble_s": assemble_s,
            "resumed_samples": self.resume_from - self.range_start,
        }

    def publish_ranges(self, others: list[tuple[Path, tuple[int, int]]]) -> dict:
        """After this writer's own range (the first) and every other range's writer closed:
        check the ranges' spools (``others``: spool folder and chunk range, in chunk order),
        write the one cache file from all of them, remove the spools; returns the file's stats
        plus this writer's timings. The file is the one a single writer would write."""
        if self._stats_done is None or self.publish or self.first_chunk != 0:
            raise ValueError("publish_ranges: close the writer of the first range (publish=False)")
        self._spool = Spool(self.spool_dir, self._spool.identity, (0, self.end_chunk), resume=True)
        spools = [self._spool]
        try:
            for folder, chunk_range in others:
                spools.append(Spool(folder, self._spool.identity, chunk_range, resume=True))
            done = [(s.first_chunk, s.first_chunk + s.num_chunks) for s in spools]
            wanted = [(0, self.end_chunk), *[r for _, r in others]]
            if done != wanted or wanted[-1][1] != self.num_chunks:
                raise FreezecacheError(
                    f"cache {self.path}: the ranks' spools hold chunks {done}, expected {wanted} "
                    f"covering 0..{self.num_chunks} — rerun the stage"
                )
            index = SpoolIndex.concat([s.index() for s in spools])
            self.range_end = self._received = self.num_samples  # now the whole data set
            self._check_complete(index)
            stats = self._file_stats(index)
            start = time.perf_counter()
            assemble_cache(self.path, spools, self._attrs(stats))
            assemble_s = time.perf_counter() - start
        except BaseException:
            for s in spools:
                s.close()
            raise
        for s in spools:
            s.remove()
        self._stats_done = {**stats, **self._timings(assemble_s)}
        return self._stats_done

    def _raw_per_sample(self) -> int:
        """float32 bytes of one sample's x and extra."""
        extra = 4 * math.prod(self.extra_shape) if self.extra_shape is not None else 0
        return 4 * math.prod(self.sample_shape) + extra

    def _check_complete(self, index: SpoolIndex) -> None:
        """All declared samples (of the range) arrived and the codec kept its bound."""
        count = self.range_end - self.range_start
        if self._received != self.range_end or index.num_samples != count:
            raise FreezecacheError(
                f"cache {self.path}: got {self._received} samples, declared {self.range_end} — "
                "pass the data set's length as num_samples"
            )
        cols = index.columns
        worst = max(float(cols["error"].max()), float(cols["extra_error"].max()))
        if self.verify and self.codec.bounded and worst > self.codec.tolerance:
            raise FreezecacheError(
                f"cache {self.path}: codec {self.codec.name} broke its bound (max error "
                f"{worst:.3g} > tolerance {self.codec.tolerance:g}) — use another codec or a "
                "larger tolerance"
            )

    def _file_stats(self, index: SpoolIndex) -> dict:
        """Sizes, ratio and errors of the finished cache: only what its bytes determine."""
        cols = index.columns
        x_stored, extra_stored = index.blob_bytes("x"), index.blob_bytes("extra")
        raw = self.num_samples * self._raw_per_sample()
        has_extra = self.extra_shape is not None
        return {
            "raw_bytes": raw,
            "stored_bytes": x_stored + extra_stored,
            "compression_ratio": (x_stored + extra_stored) / raw,
            "x_compression_ratio": x_stored / (self.num_samples * 4 * math.prod(self.sample_shape)),
            "extra_stored_bytes": extra_stored,
            "max_abs_error": float(cols["error"].max()) if self.verify else None,
            "extra_max_abs_error": float(cols["extra_error"].max())
            if self.verify and has_extra
            else None,
            "max_code_bytes": int(cols["code_bytes"].max()),
        }

    def _attrs(self, stats: dict) -> dict:
        """Root attributes, in :data:`ROOT_ATTRS` order (digests and complete follow)."""
        values = (
            FORMAT_VERSION,
            self.codec.name,
            json.dumps(self.codec.options, sort_keys=True),
            float(self.codec.tolerance),
            self.chunk_size,
            self.num_samples,
            self.num_chunks,
            np.array(self.sample_shape, dtype=np.int64),
            np.array(self.extra_shape or (), dtype=np.int64),
            np.array(self.extra_index, dtype=np.int64),
            self.prefix_hash,
            json.dumps(self.meta, sort_keys=True),
            json.dumps(stats, sort_keys=True),
        )
        return dict(zip(ROOT_ATTRS, values, strict=True))

    def _no_space(self, err: BaseException) -> FreezecacheError:
        """The one line for a disk that filled up during the build (after cleaning up)."""
        self._abort()
        return FreezecacheError(
            f"cache {self.path}: the disk filled up during the build ({self._free()}); "
            f"{self._kept()} — free space and rerun"
        )

    def _free(self) -> str:
        """Free space where the file and the spool go, for error lines."""
        places = sorted({self.path.parent, self.spool_dir.parent})
        return ", ".join(f"{human(free_bytes(p))} free on the filesystem of {p}" for p in places)

    def _kept(self) -> str:
        """What of the build survives a failure, for the error line."""
        kept = self._spool.num_samples if self.resumable else 0
        if kept:
            return f"{kept} of {self.num_samples} samples stay in {self.spool_dir} for the rerun"
        return "nothing was published"

    def _shutdown(self) -> None:
        """Stop the encoder threads, dropping queued work."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _abort(self) -> None:
        """Drop everything uncommitted: never leave a half-written cache behind."""
        if self._closed:
            return
        self._closed = True
        self._shutdown()
        self._in_flight.clear()
        self._pending.clear()
        self._labels.clear()
        try:
            if self.resumable:
                self._spool.rollback()  # the committed chunks stay for a rerun
                self._spool.close()
            else:
                self._spool.remove()
        finally:
            self.tmp_path.unlink(missing_ok=True)


def array_digest(a: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def attrs_digest(attrs: h5py.AttributeManager | dict) -> str:
    """sha256 of every root attribute but ``attrs_digest``, by name: names, types and bytes."""
    h = hashlib.sha256()
    for name in sorted(attrs):
        if name == "attrs_digest":
            continue
        value = attrs[name]
        if isinstance(value, str):
            data = b"s" + value.encode()
        else:
            a = np.ascontiguousarray(value)
            data = b"a" + f"{a.dtype.str}{a.shape}".encode() + a.tobytes()
        for part in (name.encode(), data):
            h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()


def _small_arrays(index: SpoolIndex, has_extra: bool) -> dict[str, np.ndarray]:
    """The index datasets of a cache, in the order they are written."""
    cols = index.columns
    arrays = {
        "y": index.y.astype(np.int64),
        "x_offsets": np.concatenate([[0], np.cumsum(cols["x_len"])]).astype(np.int64),
        "crc": cols["x_crc"].astype(np.uint32),
    }
    if has_extra:
        arrays["extra_offsets"] = np.concatenate([[0], np.cumsum(cols["extra_len"])])
        arrays["extra_offsets"] = arrays["extra_offsets"].astype(np.int64)
        arrays["extra_crc"] = cols["extra_crc"].astype(np.uint32)
    if index.pos.shape[1]:
        arrays["extra_pos"] = index.pos.astype(np.int64)
    return arrays


def _reserved_dataset(f: h5py.File, name: str, size: int) -> int:
    """A contiguous uint8 dataset whose space is allocated now and never filled by HDF5;
    returns its file offset, where the caller writes the bytes itself."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    ds = f.create_dataset(name, (size,), dtype=np.uint8, dcpl=dcpl, track_times=False)
    return int(ds.id.get_offset())


def _empty_h5_image() -> bytes:
    """The bytes of an empty HDF5 file, made in memory (HDF5 never writes to disk here)."""
    buf = io.BytesIO()
    with h5py.File(buf, "w", libver=_LIBVER):
        pass
    return buf.getvalue()


def _reserve(tmp: Path, size: int) -> None:
    """Start ``tmp`` as an empty HDF5 file with disk blocks claimed for its first ``size`` bytes.

    HDF5 cannot recover from a failed write (a full disk gives tracebacks from its destructors
    and a segfault at exit), so it only ever writes into space claimed here, by plain Python
    calls whose OSError a caller can handle; HDF5 cuts the file to its real length at close.
    """
    with open(tmp, "wb") as out:
        out.write(_empty_h5_image())
        out.flush()
        try:
            os.posix_fallocate(out.fileno(), 0, size)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # e.g. a filesystem without it
                raise


def _write_skeleton(
    tmp: Path, arrays: dict[str, np.ndarray], blob_sizes: dict[str, int], attrs: dict
) -> dict[str, int]:
    """The HDF5 file minus the blob bytes, into a file :func:`_reserve` started; returns where
    each blob dataset's bytes go.

    Deterministic: fixed library format versions, no timestamps, datasets and attributes
    always created in the same order, blob space reserved but left to the caller.
    """
    with h5py.File(tmp, "r+", libver=_LIBVER) as f:
        offsets = {name: _reserved_dataset(f, name, size) for name, size in blob_sizes.items()}
        for name, data in arrays.items():
            f.create_dataset(name, data=data, track_times=False)
        for name, value in attrs.items():
            f.attrs[name] = value
        f.attrs["digests"] = json.dumps(
            {name: array_digest(a) for name, a in arrays.items()}, sort_keys=True
        )
        f.attrs["complete"] = 1
        f.attrs["attrs_digest"] = attrs_digest(f.attrs)  # of the values as a reader sees them
    return offsets


def _copy_range(src: int, dst: int, count: int, at: int) -> None:
    """Copy ``count`` bytes from the start of fd ``src`` to offset ``at`` of fd ``dst``."""
    done = 0
    try:
        while done < count:  # in the kernel: no pass through Python's memory
            moved = os.copy_file_range(src, dst, count - done, done, at + done)
            if moved == 0:
                break
            done += moved
    except OSError as err:  # across filesystems on old kernels, or not supported there
        if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    while done < count:
        piece = os.pread(src, min(_CHECK_PIECE, count - done), done)
        if not piece:
            break
        done += os.pwrite(dst, piece, at + done)
    if done != count:
        raise FreezecacheError(f"cache spool blob file is {done} bytes, expected {count} — rerun")


def _copy_blobs(tmp: Path, offsets: dict[str, int], spools: list[Spool]) -> None:
    """Copy every spool's blobs into the space reserved for their dataset, then fsync.

    The blobs were crc-checked when a resumed spool was opened, or encoded by this process.
    """
    dst = os.open(tmp, os.O_WRONLY)
    try:
        for name, at in offsets.items():
            for spool in spools:
                count = spool.index().blob_bytes(name)
                src = os.open(spool.data_path(name), os.O_RDONLY)
                try:
                    _copy_range(src, dst, count, at)
                finally:
                    os.close(src)
                at += count
        os.fsync(dst)
    finally:
        os.close(dst)


def assemble_cache(path: Path, spools: list[Spool], attrs: dict) -> None:
    """Write the cache file ``path`` from ``spools`` (consecutive chunk ranges from chunk 0, in
    order) and root attributes ``attrs``; atomic: built under ``.tmp``, then renamed.

    The offsets depend only on blob lengths, so spools filled by several processes give the
    file one process would write.
    """
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    starts = [s.first_chunk for s in spools]
    expected = [0] + [s.first_chunk + s.num_chunks for s in spools[:-1]]
    if starts != expected or spools[-1].first_chunk + spools[-1].num_chunks != attrs["num_chunks"]:
        raise ValueError(f"assemble_cache: spools do not cover chunks 0..{attrs['num_chunks']}")
    index = SpoolIndex.concat([s.index() for s in spools])
    has_extra = int(np.prod(attrs["extra_shape"])) > 0 if len(attrs["extra_shape"]) else False
    arrays = _small_arrays(index, has_extra)
    blob_sizes = {"x": index.blob_bytes("x")}
    if has_extra:
        blob_sizes["extra"] = index.blob_bytes("extra")
    total = sum(blob_sizes.values()) + sum(a.nbytes for a in arrays.values()) + H5_OVERHEAD
    check_free_space({tmp: total}, what=f"cache {path}", margin=0.0)
    published = False
    try:
        _reserve(tmp, total)
        offsets = _write_skeleton(tmp, arrays, blob_sizes, attrs)
        _copy_blobs(tmp, offsets, spools)
        os.replace(tmp, path)
        published = True
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if published:  # the rename may not be durable: publish nothing rather than maybe
            path.unlink(missing_ok=True)
        raise


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
    digests: dict = field(default_factory=dict)  # index dataset name -> array_digest

    def codec(self) -> Codec:
        """The codec the cache was written with."""
        return make_codec(self.codec_name, self.tolerance, **self.codec_options)

    def chunk_bounds(self, i: int) -> tuple[int, int]:
        """Sample range [start, stop) of chunk ``i``."""
        start = i * self.chunk_size
        return start, min(start + self.chunk_size, self.num_samples)


def open_cache(
    path: Path,
    *,
    expect_prefix_hash: str | None = None,
    stage: str | None = None,
    full: bool = False,
) -> CacheInfo:
    """Check a cache file and read its description; ``stage`` names the producer in errors.

    Checks the attributes and the index datasets against their digests; ``full`` also checks
    every blob against its crc (one read of the whole file; otherwise a blob is checked when it
    is read). A damaged or tampered file raises one line.
    """
    path = Path(path)
    hint = _rerun_hint(stage)
    if not path.is_file():
        raise FreezecacheError(f"cache {path} does not exist — {hint}")
    try:
        with h5py.File(path, "r") as f:
            info = _read_info(path, f, hint)
            if full:
                _check_blobs(info, f, hint)
    except (KeyError, ValueError, TypeError) as err:  # a root attribute missing or malformed
        raise FreezecacheError(
            f"cache {path} has a missing or malformed attribute ({_first_line(err)}) — {hint}"
        ) from None
    except (OSError, RuntimeError) as err:  # h5py: damaged file structure
        raise FreezecacheError(
            f"cache {path} is not a readable HDF5 file ({_first_line(err)}) — {hint}"
        ) from None
    if expect_prefix_hash is not None and info.prefix_hash != expect_prefix_hash:
        raise FreezecacheError(
            f"cache {path} was built from prefix {info.prefix_hash[:12]} but this run's prefix "
            f"is {expect_prefix_hash[:12]} — {hint}"
        )
    return info


def _first_line(err: BaseException) -> str:
    """An exception's first line, or its type when it has no text."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _read_info(path: Path, f: h5py.File, hint: str) -> CacheInfo:
    """Read and cross-check the root attributes and index datasets of an open cache file."""
    attrs = f.attrs
    if int(attrs.get("complete", 0)) != 1:
        raise FreezecacheError(f"cache {path} is incomplete (no complete flag) — {hint}")
    version = int(attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise FreezecacheError(
            f"cache {path} has format_version {version}, this freezecache reads "
            f"{FORMAT_VERSION} — {hint}"
        )
    if attrs.get("attrs_digest") != attrs_digest(attrs):
        raise FreezecacheError(
            f"cache {path}: its attributes do not match their digest (corrupt or edited) — {hint}"
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
        digests=json.loads(attrs["digests"]),
    )
    _check_counts(info, f, hint)
    check_index({name: f[name][()] for name in _INDEX_DATASETS if name in f}, info, hint)
    return info


def check_index(arrays: dict[str, np.ndarray], info: CacheInfo, hint: str | None = None) -> None:
    """Raise one line unless ``arrays`` are exactly the index datasets ``info.digests`` names."""
    hint = hint or _rerun_hint(None)
    if set(arrays) != set(info.digests):
        raise FreezecacheError(
            f"cache {info.path} has index datasets {sorted(arrays)}, its digests name "
            f"{sorted(info.digests)} (corrupt or edited) — {hint}"
        )
    for name, data in arrays.items():
        if array_digest(data) != info.digests[name]:
            raise FreezecacheError(
                f"cache {info.path}: dataset '{name}' does not match its digest (corrupt or "
                f"edited) — {hint}"
            )


def _check_blobs(info: CacheInfo, f: h5py.File, hint: str) -> None:
    """Every blob of the cache against its crc, reading whole blobs in large pieces."""
    for name in ("x", "extra") if info.extra_shape is not None else ("x",):
        offsets = f[f"{name}_offsets"][()]
        crcs = f["crc" if name == "x" else "extra_crc"][()]
        ds, first = f[name], 0
        while first < info.num_chunks:
            stop = int(np.searchsorted(offsets, offsets[first] + _CHECK_PIECE, "right")) - 1
            stop = min(max(stop, first + 1), info.num_chunks)
            data = memoryview(ds[offsets[first] : offsets[stop]].tobytes())
            base = int(offsets[first])
            for i in range(first, stop):
                if zlib.crc32(data[offsets[i] - base : offsets[i + 1] - base]) != int(crcs[i]):
                    raise FreezecacheError(
                        f"cache {info.path}: chunk {i} of '{name}' is corrupt (crc mismatch) — "
                        f"{hint}"
                    )
            first = stop


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
        self._fd: int | None = None  # the file opened again for pread (see _h5)
        self._at: dict[str, int] = {}  # blob dataset -> its bytes' offset in the file
        self._small: dict[str, np.ndarray] = {}
        self._memory: dict[str, np.ndarray] | None = None
        if in_memory:
            self._memory = self._load_all()

    def __len__(self) -> int:
        return self.info.num_chunks

    def __getstate__(self) -> dict:
        # An open h5py handle cannot cross a process boundary; each worker reopens. The
        # in-memory bytes travel (forked workers share their pages).
        return {**self.__dict__, "_file": None, "_pid": None, "_fd": None, "_at": {}, "_small": {}}

    def __del__(self) -> None:
        self._close_fd()

    def _close_fd(self) -> None:
        if getattr(self, "_fd", None) is not None:  # forked children hold their own copy
            os.close(self._fd)
        self._fd = None

    def _h5(self) -> h5py.File:
        """The file, opened lazily once per process (never before DataLoader workers fork).

        Labels, offsets, crcs and token positions are small: they are read into memory here
        once, so that an item costs one read per blob. The blob datasets are contiguous (the
        writer reserves them), so a blob is one ``os.pread`` at the dataset's file offset,
        about a tenth of an h5py slice read; a dataset HDF5 stores otherwise is sliced.
        """
        if self._file is None or self._pid != os.getpid():
            self._close_fd()
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
            f = self._file
            self._small = {name: f[name][()] for name in _INDEX_DATASETS if name in f}
            self._at = {}
            for name in ("x", "extra"):
                if name in f and f[name].chunks is None and f[name].id.get_offset() is not None:
                    self._at[name] = int(f[name].id.get_offset())
            self._fd = os.open(self.path, os.O_RDONLY) if self._at else None
            if self.info.digests:  # the file may have changed since open_cache checked it
                check_index(self._small, self.info)
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
        self._close_fd()
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
        at = self._at.get(name)

        def span(a: int, b: int) -> bytes:  # bytes a..b of the dataset
            if at is None:
                return ds[a:b].tobytes()
            return os.pread(self._fd, b - a, at + a)  # short if cut: the crc check catches it

        if ids == list(range(ids[0], ids[0] + len(ids))):  # in order (iter_cache): one read
            data = span(int(offsets[ids[0]]), int(offsets[ids[-1] + 1]))
            base = offsets[ids[0]]
            blobs = [data[offsets[i] - base : offsets[i + 1] - base] for i in ids]
        else:
            blobs = [span(int(offsets[i]), int(offsets[i + 1])) for i in ids]
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
    path: Path, info: CacheInfo, batch_chunks: int = 64, workers: int = 2, first_chunk: int = 0
) -> Iterator[dict]:
    """Read the cache in order from ``first_chunk`` on, decoded on CPU, ``batch_chunks`` chunks
    per batch.

    For pushing a cache through more blocks; decoding runs in ``workers`` threads. A resumed
    cache build starts at ``writer.resume_from // chunk_size`` (with ``align`` a multiple of
    ``batch_chunks * chunk_size``, its batches are those of an uninterrupted build).
    """
    dataset = CacheDataset(path, info)
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        for first in range(first_chunk, info.num_chunks, batch_chunks):
            raw = dataset.read(list(range(first, min(first + batch_chunks, info.num_chunks))))
            # h5py serialises reads behind one lock, so only decoding runs in the threads.
            yield collate_chunks(list(pool.map(lambda r: dataset.build(*r), raw)))
