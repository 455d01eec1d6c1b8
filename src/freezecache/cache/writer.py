"""The cache writer: samples in, chunks encoded in threads, a resumable spool, one file out.

Why it is long: :class:`CacheWriter` is one state machine (samples pending a chunk, encoder
tasks in flight, the spool, the received count) whose every error path must clean up all of
it at once; the encoding tasks, the file format, the assembly and the size estimate already
live in their own modules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from freezecache.cache.assemble import assemble_cache
from freezecache.cache.encode import TASK_CHUNKS, Encoded, compress_group, encode_group
from freezecache.cache.format import FORMAT_VERSION, Layout, file_stats, root_attrs
from freezecache.cache.size import estimate_cache_bytes
from freezecache.cache.spool import Spool, SpoolIndex
from freezecache.codecs import Codec
from freezecache.codecs.quant import QuantCodec
from freezecache.core.disk import check_free_space, free_bytes, human, is_no_space
from freezecache.core.errors import FreezecacheError

log = logging.getLogger(__name__)

_COMMIT_BYTES = 256 << 20  # spool bytes after which a commit is due even before commit_s
_SPACE_SAMPLE = 64  # samples of the first batch encoded for the disk-space estimate


@dataclass(frozen=True)
class Build:
    """How a build runs, not what it writes: encoder threads, verification, the spool and its
    resumption, and the chunk range of one rank (see :class:`CacheWriter`)."""

    workers: int = 2
    verify: bool = True
    spool_dir: Path | None = None
    resume_key: str | None = None
    align: int = 1  # a resumed build restarts at a multiple of this many samples
    check_space: bool = True
    commit_s: float = 1.0
    chunk_range: tuple[int, int] | None = None
    publish: bool = True


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """``np.concatenate(parts)``, without the copy when there is one part."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def spool_identity(key: str, codec: Codec, layout: Layout, verify: bool, prefix_hash: str) -> str:
    """What a spool must have been built for to be resumed: the caller's key and the layout."""
    doc = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "codec": codec.name,
        "codec_options": codec.options,
        "tolerance": float(codec.tolerance),
        "chunk_size": layout.chunk_size,
        "num_samples": layout.num_samples,
        "sample_shape": layout.sample_shape,
        "extra_shape": layout.extra_shape,
        "verify": verify,
        "prefix_hash": prefix_hash,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


class CacheWriter:
    """Writes a cache file chunk by chunk; use as a context manager.

    Samples arrive through :meth:`add` in data-set order, in batches of any size; the writer cuts
    them into chunks of ``chunk_size`` and encodes chunks in a thread pool (zfpy and zstandard
    release the GIL) while the caller computes the next batch. Encoded chunks go to a spool
    (:mod:`freezecache.cache.spool`, at ``build.spool_dir``) that is committed to disk about every
    ``commit_s`` seconds; :meth:`close` assembles the cache file from the spool in one pass, so
    its bytes depend only on the samples and the parameters.

    ``layout`` says what the file holds, ``build`` (:class:`Build`) how the build runs. With a
    ``build.resume_key`` (a digest of everything the samples depend on, e.g. prefix and params
    hashes), a writer that finds a spool of the same key and layout keeps its verified chunks:
    :attr:`resume_from` samples (a multiple of ``chunk_size`` and of ``align``) are durable and
    the caller adds samples from there on. Without one, the spool is temporary.

    Before the first batch is written, the cache's size is estimated from that batch
    (:func:`freezecache.cache.size.estimate_cache_bytes`) and refused with one line when the spool's
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
        codec: Codec,
        layout: Layout,
        *,
        prefix_hash: str,
        meta: dict | None = None,
        build: Build | None = None,
    ) -> None:
        b = build or Build()
        chunk_size, num_samples, align = layout.chunk_size, layout.num_samples, b.align
        if chunk_size < 1 or num_samples < 1 or align < 1:
            raise FreezecacheError(
                f"cache {path}: chunk_size ({chunk_size}), num_samples ({num_samples}) and "
                f"align ({align}) must be >= 1 — fix the cache params"
            )
        self.path = Path(path)
        self.tmp_path = self.path.with_suffix(".tmp")
        self.spool_dir = Path(b.spool_dir or self.path.with_name(f".{self.path.name}.spool"))
        self.codec = codec
        self.layout = Layout(
            tuple(int(n) for n in layout.sample_shape),
            num_samples,
            chunk_size,
            None if layout.extra_shape is None else tuple(int(n) for n in layout.extra_shape),
            tuple(int(i) for i in (layout.extra_index or ())),
        )
        self.sample_shape, self.extra_shape = self.layout.sample_shape, self.layout.extra_shape
        self.extra_index = list(self.layout.extra_index)
        self.chunk_size = chunk_size
        self.num_samples = num_samples
        self.num_chunks = self.layout.num_chunks
        chunk_range = b.chunk_range
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
        resume_key, workers = b.resume_key, b.workers
        if not b.publish and resume_key is None:
            raise ValueError(f"cache {path}: a writer that only spools needs a resume_key")
        self.publish = b.publish
        self.prefix_hash = prefix_hash
        self.meta = meta or {}
        self.verify = b.verify
        self.resumable = resume_key is not None
        self.align = align
        self.commit_s = b.commit_s
        self._space_checked = not b.check_space
        self._pending: list[tuple] = []  # (x, extra, y, pos) of samples not yet in a chunk
        self._labels: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self._in_flight: deque[Future[list[Encoded]]] = deque()
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
        return spool_identity(resume_key, self.codec, self.layout, self.verify, self.prefix_hash)

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
                (compress_group, self.codec, first + lo, quant_x[lo : lo + TASK_CHUNKS],
                 quant_extra[lo : lo + TASK_CHUNKS] if quant_extra else None,
                 per_chunk * len(quant_x[lo : lo + TASK_CHUNKS].payloads))
                for lo in range(0, len(xs), TASK_CHUNKS)
            ]  # fmt: skip
        else:
            tasks = [
                (encode_group, self.codec, first + lo, xs[lo : lo + TASK_CHUNKS],
                 None if extras is None else extras[lo : lo + TASK_CHUNKS], self.verify)
                for lo in range(0, len(xs), TASK_CHUNKS)
            ]  # fmt: skip
        for task, *args in tasks:
            if self._pool is None:
                self._write(task(*args))
                continue
            self._in_flight.append(self._pool.submit(task, *args))
            while len(self._in_flight) >= self._max_in_flight:
                self._write(self._in_flight.popleft().result())

    def _write(self, encoded: list[Encoded]) -> None:
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
        raw_mb = self._encoded_samples * self.layout.raw_bytes_per_sample() / 1e6
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
        return file_stats(self.layout, index, self.verify)

    def _attrs(self, stats: dict) -> dict:
        return root_attrs(self.codec, self.layout, self.prefix_hash, self.meta, stats)

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
