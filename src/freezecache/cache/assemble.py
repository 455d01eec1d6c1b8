"""Writing a cache file from build spools, in one pass, deterministically and atomically.

HDF5 writes only the small datasets and the metadata; the blob bytes are copied into space
reserved for them, so a full disk meets plain file writes, never HDF5's. The offsets depend
only on blob lengths, so spools filled by several processes give the file one process writes.
"""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import h5py
import numpy as np

from freezecache.cache.format import array_digest, attrs_digest
from freezecache.cache.size import H5_OVERHEAD
from freezecache.cache.spool import Spool, SpoolIndex, fsync_dir
from freezecache.core.disk import check_free_space
from freezecache.core.errors import FreezecacheError

_LIBVER = ("v110", "v110")  # fixed HDF5 object formats: the same bytes from any HDF5 >= 1.10
_COPY_PIECE = 16 << 20  # bytes per read when the kernel cannot copy a range itself


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
        piece = os.pread(src, min(_COPY_PIECE, count - done), done)
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
