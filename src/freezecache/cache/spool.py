"""Append-only spool of encoded cache chunks: what makes a cache build resumable.

A spool directory holds the progress of one cache build, outside the cache's output path (DVC
deletes a stage's outputs before it reruns the stage)::

    identity.json   what is being built (a digest of the caller's key and the cache layout)
                    and the chunk range [first_chunk, end_chunk) this spool fills
    x.bin           the x blobs of chunks first_chunk, first_chunk + 1, ... back to back
    extra.bin       the extra blobs likewise (empty without extra data)
    journal.bin     one record per commit: blob lengths, crcs, errors and code widths of the
                    committed chunks, their labels and token positions; each record ends in
                    the crc32 of its bytes
    lock            flock'ed while a writer holds the spool

A commit fsyncs the blob files before it appends and fsyncs its journal record, so a record on
disk always describes blob bytes that are on disk. Reopening a spool with the same identity keeps
the longest run of records whose own crc and whose blobs' crcs check out, and cuts the rest.

Several processes (e.g. torchrun ranks) can each fill a spool for a disjoint, deterministic chunk
range; :func:`freezecache.store.assemble_cache` reads spools in chunk order, and the cache's
offsets depend only on blob lengths, so the file equals the one a single process writes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from freezecache.core.errors import FreezecacheError

SPOOL_VERSION = 1
_HEAD = struct.Struct("<4sQQQQ")  # magic, first chunk, chunks, samples, token positions per sample
_MAGIC = b"FCJ1"
_TAIL = struct.Struct("<I")  # crc32 of the record before it
# Per-chunk columns of a record, in record order, and their dtypes.
CHUNK_COLUMNS = {
    "samples": np.int64,
    "x_len": np.int64,
    "extra_len": np.int64,
    "x_crc": np.uint32,
    "extra_crc": np.uint32,
    "error": np.float64,
    "extra_error": np.float64,
    "code_bytes": np.int64,
}
_READ_PIECE = 16 << 20  # bytes per read when checking blobs


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class SpoolIndex:
    """Everything a cache needs besides the blob bytes, for a run of consecutive chunks."""

    columns: dict[str, np.ndarray]  # CHUNK_COLUMNS, one entry per chunk
    y: np.ndarray  # (samples,) int64
    pos: np.ndarray  # (samples, m) int64; m = 0 without token positions

    @classmethod
    def empty(cls, pos_width: int = 0) -> SpoolIndex:
        cols = {name: np.zeros(0, dtype) for name, dtype in CHUNK_COLUMNS.items()}
        return cls(cols, np.zeros(0, np.int64), np.zeros((0, pos_width), np.int64))

    @property
    def num_chunks(self) -> int:
        return len(self.columns["x_len"])

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def blob_bytes(self, name: str) -> int:
        """Total length of the ``name`` ("x" or "extra") blobs."""
        return int(self.columns[f"{name}_len"].sum())

    def head(self, chunks: int) -> SpoolIndex:
        """The first ``chunks`` chunks."""
        samples = int(self.columns["samples"][:chunks].sum())
        cols = {name: col[:chunks] for name, col in self.columns.items()}
        return SpoolIndex(cols, self.y[:samples], self.pos[:samples])

    @staticmethod
    def concat(parts: list[SpoolIndex]) -> SpoolIndex:
        """Indexes of consecutive chunk runs, joined."""
        parts = [p for p in parts if p.num_chunks] or parts[:1] or [SpoolIndex.empty()]
        if len(parts) == 1:
            return parts[0]
        cols = {name: np.concatenate([p.columns[name] for p in parts]) for name in CHUNK_COLUMNS}
        return SpoolIndex(
            cols, np.concatenate([p.y for p in parts]), np.concatenate([p.pos for p in parts])
        )


def _record(first: int, index: SpoolIndex) -> bytes:
    """One journal record for ``index``, chunks starting at ``first``."""
    body = [_HEAD.pack(_MAGIC, first, index.num_chunks, len(index.y), index.pos.shape[1])]
    body += [index.columns[name].astype(dtype).tobytes() for name, dtype in CHUNK_COLUMNS.items()]
    body += [index.y.astype(np.int64).tobytes(), index.pos.astype(np.int64).tobytes()]
    data = b"".join(body)
    return data + _TAIL.pack(zlib.crc32(data))


def _parse_journal(data: bytes, first: int) -> tuple[list[SpoolIndex], int]:
    """The valid, consecutive records at the start of ``data``; and their byte length."""
    parts, at, next_chunk = [], 0, first
    while at + _HEAD.size <= len(data):
        magic, start, chunks, samples, m = _HEAD.unpack_from(data, at)
        if magic != _MAGIC or start != next_chunk:
            break
        widths = [np.dtype(dtype).itemsize * chunks for dtype in CHUNK_COLUMNS.values()]
        size = _HEAD.size + sum(widths) + 8 * samples * (1 + m)
        end = at + size + _TAIL.size
        if (
            end > len(data)
            or zlib.crc32(data[at : at + size]) != _TAIL.unpack_from(data, at + size)[0]
        ):
            break
        off, cols = at + _HEAD.size, {}
        for (name, dtype), width in zip(CHUNK_COLUMNS.items(), widths, strict=True):
            cols[name] = np.frombuffer(data, dtype, chunks, off)
            off += width
        y = np.frombuffer(data, np.int64, samples, off)
        pos = np.frombuffer(data, np.int64, samples * m, off + 8 * samples).reshape(samples, m)
        parts.append(SpoolIndex(cols, y, pos))
        at, next_chunk = end, next_chunk + chunks
    return parts, at


def verified_pieces(
    path: Path, lengths: np.ndarray, crcs: np.ndarray, piece: int = _READ_PIECE
) -> Iterator[tuple[int, memoryview]]:
    """Runs of whole blobs read from ``path`` (blob i has ``lengths[i]`` bytes and crc
    ``crcs[i]``), each with the number of blobs checked so far; stops at the first blob that is
    missing or whose crc does not match."""
    lengths, crcs = [int(n) for n in lengths], [int(c) for c in crcs]
    done = 0
    with open(path, "rb") as f:
        while done < len(lengths):
            stop, size = done, 0
            while stop < len(lengths) and (size == 0 or size + lengths[stop] <= piece):
                size, stop = size + lengths[stop], stop + 1
            view = memoryview(f.read(size))
            at, good = 0, done
            for i in range(done, stop):
                end = at + lengths[i]
                if end > len(view) or zlib.crc32(view[at:end]) != crcs[i]:
                    break
                at, good = end, i + 1
            if good > done:
                yield good, view[:at]
            if good < stop:
                return
            done = stop


def good_prefix(path: Path, lengths: np.ndarray, crcs: np.ndarray) -> int:
    """How many leading blobs of file ``path`` are whole and match their crcs."""
    good = 0
    if len(lengths) and path.is_file():
        for good, _ in verified_pieces(path, lengths, crcs):  # noqa: B007 (the last count)
            pass
    return good


class Spool:
    """The spool of one build or of one chunk range of it; see the module docstring.

    Chunks go in with :meth:`append` in chunk order and become durable with :meth:`commit`.
    Used from one thread.
    """

    def __init__(
        self,
        root: Path,
        identity: str,
        chunk_range: tuple[int, int],
        *,
        resume: bool,
        durable: bool = True,
    ) -> None:
        """Open the spool at ``root``: with ``resume``, keep the verified chunks of an existing
        spool of the same ``identity`` and range; otherwise (or when they differ) start empty.

        ``durable=False`` (a spool no one will resume): commits skip the fsyncs and the journal.
        """
        self.root = Path(root)
        self.durable = durable
        self.identity = identity
        self.first_chunk, self.end_chunk = chunk_range
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock: int | None = self._take_lock()
        try:
            index = self._load() if resume else None
            if index is None:
                self._reset()
                index = SpoolIndex.empty()
        except BaseException:
            self.close()
            raise
        self._parts = [index]
        self._pending: list[tuple] = []
        self._pending_bytes = 0
        self._files = {name: open(self.root / f"{name}.bin", "ab") for name in ("x", "extra")}

    # -- state --------------------------------------------------------------------------------
    @property
    def num_chunks(self) -> int:
        """Durable (committed) chunks."""
        return sum(p.num_chunks for p in self._parts)

    @property
    def num_samples(self) -> int:
        """Samples in the durable chunks."""
        return sum(p.num_samples for p in self._parts)

    @property
    def pending_chunks(self) -> int:
        """Chunks appended since the last commit."""
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        """Blob bytes appended since the last commit."""
        return self._pending_bytes

    def index(self) -> SpoolIndex:
        """The index of the durable chunks."""
        self._parts = [SpoolIndex.concat(self._parts)]
        return self._parts[0]

    def data_path(self, name: str) -> Path:
        """The blob file of ``name`` ("x" or "extra")."""
        return self.root / f"{name}.bin"

    # -- writing -------------------------------------------------------------------------------
    def append(
        self,
        blob: bytes,
        extra_blob: bytes | None,
        *,
        crcs: tuple[int, int],
        errors: tuple[float, float],
        code_bytes: int,
        y: np.ndarray,
        pos: np.ndarray | None,
    ) -> None:
        """Add the next chunk: its blobs (written now) and index entries (journaled on commit)."""
        extra_blob = extra_blob or b""
        self._files["x"].write(blob)
        if extra_blob:
            self._files["extra"].write(extra_blob)
        pos = np.zeros((len(y), 0), np.int64) if pos is None else pos
        self._pending.append(
            (len(y), len(blob), len(extra_blob), *crcs, *errors, code_bytes, y, pos)
        )
        self._pending_bytes += len(blob) + len(extra_blob)

    def commit(self) -> None:
        """Make the appended chunks durable: fsync the blobs, then journal them (only the
        first step when not ``durable``: the blob files then hold them for assembly)."""
        if not self._pending:
            return
        for f in self._files.values():
            f.flush()
            if self.durable:
                os.fsync(f.fileno())
        rows = list(zip(*self._pending, strict=True))
        cols = {
            name: np.array(rows[i], dtype) for i, (name, dtype) in enumerate(CHUNK_COLUMNS.items())
        }
        part = SpoolIndex(cols, np.concatenate(rows[-2]).astype(np.int64),
                          np.concatenate(rows[-1]).astype(np.int64))  # fmt: skip
        if self.durable:
            first = self.first_chunk + self.num_chunks
            with open(self.root / "journal.bin", "ab") as journal:
                journal.write(_record(first, part))
                journal.flush()
                os.fsync(journal.fileno())
        self._parts.append(part)
        self._pending.clear()
        self._pending_bytes = 0

    def cut(self, chunks: int) -> None:
        """Keep only the first ``chunks`` durable chunks (drops anything pending)."""
        self._close_files()
        self._pending.clear()
        self._pending_bytes = 0
        self._parts = [self.index().head(chunks)]
        self._rewrite(self._parts[0])
        self._files = {name: open(self.data_path(name), "ab") for name in ("x", "extra")}

    def rollback(self) -> None:
        """Drop the chunks appended since the last commit (frees their disk space)."""
        self.cut(self.num_chunks)

    def close(self) -> None:
        """Close the files and release the lock; the spool stays on disk."""
        self._close_files()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def remove(self) -> None:
        """Close and delete the spool."""
        self.close()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- opening -------------------------------------------------------------------------------
    def _close_files(self) -> None:
        for f in getattr(self, "_files", {}).values():
            try:
                f.close()
            except OSError:  # a failed flush of the uncommitted tail (disk full): dropped anyway
                pass
        self._files = {}

    def _take_lock(self) -> int:
        """An exclusive lock on the spool, so two builds never write one spool."""
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FreezecacheError(
                f"cache spool {self.root} is in use by another build — wait for it to finish"
            ) from None
        return fd

    def _identity_doc(self) -> dict:
        return {
            "version": SPOOL_VERSION,
            "identity": self.identity,
            "first_chunk": self.first_chunk,
            "end_chunk": self.end_chunk,
        }

    def _load(self) -> SpoolIndex | None:
        """The verified chunks of an existing spool of this identity; None if there is none."""
        try:
            doc = json.loads((self.root / "identity.json").read_text())
            journal = (self.root / "journal.bin").read_bytes()
        except (OSError, ValueError):
            return None
        if doc != self._identity_doc():
            return None
        parts, _ = _parse_journal(journal, self.first_chunk)
        index = SpoolIndex.concat(parts)
        good = index.num_chunks
        for name in ("x", "extra"):
            lengths = index.columns[f"{name}_len"][:good]
            crcs = index.columns[f"{name}_crc"][:good]
            good = min(good, good_prefix(self.data_path(name), lengths, crcs))
        index = index.head(min(good, self.end_chunk - self.first_chunk))
        self._rewrite(index)
        return index

    def _reset(self) -> None:
        """Start an empty spool of this identity."""
        tmp = self.root / "identity.json.tmp"
        tmp.write_text(json.dumps(self._identity_doc()))
        self._rewrite(SpoolIndex.empty())
        os.replace(tmp, self.root / "identity.json")
        fsync_dir(self.root)

    def _rewrite(self, index: SpoolIndex) -> None:
        """Journal = one record of ``index``; blob files cut to its chunks (atomic journal)."""
        tmp = self.root / "journal.bin.tmp"
        with open(tmp, "wb") as journal:
            if index.num_chunks:
                journal.write(_record(self.first_chunk, index))
            journal.flush()
            os.fsync(journal.fileno())
        os.replace(tmp, self.root / "journal.bin")
        for name in ("x", "extra"):
            with open(self.data_path(name), "ab") as f:
                f.truncate(index.blob_bytes(name))
        fsync_dir(self.root)
