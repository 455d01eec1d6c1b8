"""The cache file format: layout, digests, what a cache holds, and opening one safely.

A cache is one HDF5 file holding a frozen prefix's outputs for a whole data set.

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
a whole cache can be read into memory in one call (``in_memory`` of
:class:`freezecache.cache.reader.CacheDataset`).

Every byte training reads is checked: :func:`open_cache` checks the attributes and the index
datasets (labels, offsets, crcs, token positions) against their digests, and every blob is
checked against its crc when it is read (or all at once: ``open_cache(full=True)``).

stats: ``raw_bytes`` (float32 size of x and extra), ``stored_bytes`` (their blobs),
``compression_ratio`` = stored / raw, ``x_compression_ratio`` (x alone), ``extra_stored_bytes``,
``max_abs_error`` / ``extra_max_abs_error`` (zfp and none: measured by decoding every blob;
quant: the largest per-chunk bound, proved or measured, see
:meth:`freezecache.codecs.quant.QuantCodec.quantize`; None without verify), ``max_code_bytes``
(widest quant code; 0 for other codecs). No timings: the same samples and parameters give a
byte-identical file (:meth:`freezecache.cache.writer.CacheWriter.close` returns them).

A writer spools encoded chunks (:mod:`freezecache.cache.spool`), then writes the file in one pass
under ``path.with_suffix(".tmp")`` and renames it into place, so a file at ``path`` is whole.
HDF5 writes only the small datasets and the metadata; the blob bytes are copied into space
reserved for them, so a full disk meets plain file writes, never HDF5's.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from freezecache.codecs import Codec
from freezecache.codecs.registry import make_codec
from freezecache.core.errors import FreezecacheError

FORMAT_VERSION = 3
INDEX_DATASETS = ("y", "x_offsets", "crc", "extra_offsets", "extra_crc", "extra_pos")
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


@dataclass(frozen=True)
class Layout:
    """What a cache holds, fixed before its first sample: shapes, count and chunking.

    ``extra_shape`` is the per-sample shape of the augmentation data stored next to each sample
    (stored flipped channels (m, H, W) or replacement tokens (m, D)); ``extra_index`` the CNN
    channel indices shared by all samples (empty for tokens, whose positions are per sample)."""

    sample_shape: tuple[int, ...]
    num_samples: int
    chunk_size: int = 1
    extra_shape: tuple[int, ...] | None = None
    extra_index: tuple[int, ...] = ()

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_samples / self.chunk_size)

    def chunk_bounds(self, i: int) -> tuple[int, int]:
        """Sample range [start, stop) of chunk ``i``."""
        start = i * self.chunk_size
        return start, min(start + self.chunk_size, self.num_samples)

    def raw_bytes_per_sample(self) -> int:
        """float32 bytes of one sample's x and extra."""
        extra = 4 * math.prod(self.extra_shape) if self.extra_shape is not None else 0
        return 4 * math.prod(self.sample_shape) + extra


def rerun_hint(stage: str | None) -> str:
    """The 'what to do' half of cache errors."""
    if stage:
        return f"rerun `dvc repro {stage}`"
    return "rerun `dvc repro` for the stage that writes it"


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

    @property
    def layout(self) -> Layout:
        """Shapes, count and chunking, as the writer was given them."""
        return Layout(
            self.sample_shape, self.num_samples, self.chunk_size, self.extra_shape, self.extra_index
        )

    def chunk_bounds(self, i: int) -> tuple[int, int]:
        """Sample range [start, stop) of chunk ``i`` (as :meth:`Layout.chunk_bounds`)."""
        start = i * self.chunk_size
        return start, min(start + self.chunk_size, self.num_samples)


def open_cache(
    path: Path,
    *,
    expect_prefix_hash: str | None = None,
    stage: str | None = None,
    full: bool = False,
    hint: str | None = None,
) -> CacheInfo:
    """Check a cache file and read its description; ``stage`` names the producer in errors
    (``hint``: what to do instead of rerunning a stage, for caches built outside the pipeline).

    Checks the attributes and the index datasets against their digests; ``full`` also checks
    every blob against its crc (one read of the whole file; otherwise a blob is checked when it
    is read). A damaged or tampered file raises one line.
    """
    path = Path(path)
    hint = hint or rerun_hint(stage)
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
            f"is {expect_prefix_hash[:12]} (other weights) — {hint}"
        )
    return info


def _first_line(err: BaseException) -> str:
    """An exception's first line, or its type when it has no text."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _read_info(path: Path, f: h5py.File, hint: str) -> CacheInfo:
    """Read and cross-check the root attributes and index datasets of an open cache file."""
    attrs = f.attrs
    if "format_version" not in attrs and "complete" not in attrs:
        raise FreezecacheError(
            f"cache {path} is an HDF5 file but not a freezecache cache (none of its attributes) "
            f"— {hint}"
        )
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
    check_index({name: f[name][()] for name in INDEX_DATASETS if name in f}, info, hint)
    return info


def check_index(arrays: dict[str, np.ndarray], info: CacheInfo, hint: str | None = None) -> None:
    """Raise one line unless ``arrays`` are exactly the index datasets ``info.digests`` names."""
    hint = hint or rerun_hint(None)
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


def corrupt(path: Path, name: str, i: int) -> FreezecacheError:
    """The error for a blob whose crc does not match."""
    return FreezecacheError(
        f"cache {path}: chunk {i} of '{name}' is corrupt (crc mismatch) — "
        "rebuild the cache (`dvc repro`)"
    )


def file_stats(layout: Layout, index, verify: bool) -> dict:
    """A finished cache's sizes, ratio and errors, from its spool index: only what its bytes
    determine (the ``stats`` attribute; see the module docstring)."""
    cols = index.columns
    x_stored, extra_stored = index.blob_bytes("x"), index.blob_bytes("extra")
    raw = layout.num_samples * layout.raw_bytes_per_sample()
    has_extra = layout.extra_shape is not None
    return {
        "raw_bytes": raw,
        "stored_bytes": x_stored + extra_stored,
        "compression_ratio": (x_stored + extra_stored) / raw,
        "x_compression_ratio": x_stored / (layout.num_samples * 4 * math.prod(layout.sample_shape)),
        "extra_stored_bytes": extra_stored,
        "max_abs_error": float(cols["error"].max()) if verify else None,
        "extra_max_abs_error": float(cols["extra_error"].max()) if verify and has_extra else None,
        "max_code_bytes": int(cols["code_bytes"].max()),
    }


def root_attrs(codec: Codec, layout: Layout, prefix_hash: str, meta: dict, stats: dict) -> dict:
    """Root attributes, in :data:`ROOT_ATTRS` order (digests and complete follow)."""
    values = (
        FORMAT_VERSION,
        codec.name,
        json.dumps(codec.options, sort_keys=True),
        float(codec.tolerance),
        layout.chunk_size,
        layout.num_samples,
        layout.num_chunks,
        np.array(layout.sample_shape, dtype=np.int64),
        np.array(layout.extra_shape or (), dtype=np.int64),
        np.array(layout.extra_index, dtype=np.int64),
        prefix_hash,
        json.dumps(meta, sort_keys=True),
        json.dumps(stats, sort_keys=True),
    )
    return dict(zip(ROOT_ATTRS, values, strict=True))
